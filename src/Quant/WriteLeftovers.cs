using System.Globalization;
using System.Text.RegularExpressions;

namespace QLora.Quant;

/// <summary>
/// The names the project gives what it writes before a write is complete: staging folders
/// (<c>&lt;target&gt;.partial-&lt;pid&gt;-&lt;hex&gt;</c>, with <c>.old</c> for the folder they replace) and temporary files
/// (<c>.&lt;name&gt;.&lt;pid&gt;-&lt;hex&gt;.qlora-tmp</c>). A process killed mid-write leaves them behind; because the
/// names carry the writer's process id, the next run can recognise them as the project's own and remove those whose
/// writer is gone, without ever touching a file it did not write or one a live process is still writing.
/// </summary>
public static partial class WriteLeftovers
{
    /// <summary>The suffix of temporary files (git-ignored, recognised by <see cref="Clean"/>).</summary>
    public const string TempSuffix = ".qlora-tmp";

    /// <summary>The temporary path beside <paramref name="finalPath"/> that a writer fills before renaming it into place.</summary>
    public static string TempPathFor(string finalPath)
    {
        string full = Path.GetFullPath(finalPath);
        return Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Environment.ProcessId}-{Guid.NewGuid():N}{TempSuffix}");
    }

    /// <summary>The staging folder beside <paramref name="target"/> (a full path without a trailing separator).</summary>
    public static string StagingPathFor(string target) => target + $".partial-{Environment.ProcessId}-{Guid.NewGuid():N}"[..24];

    [GeneratedRegex(@"\.partial-(\d+)-[0-9a-f]+(\.old)?(-dense)?$")]
    private static partial Regex StagingPattern();

    [GeneratedRegex(@"^\..+\.(?:(\d+)-)?[0-9a-f]{32}\.qlora-tmp$")]
    private static partial Regex TempPattern();

    /// <summary>
    /// True when <paramref name="name"/> (a file or folder name) is one of the project's unfinished writes;
    /// <paramref name="pid"/> is its writer's process id when the name records it.
    /// </summary>
    public static bool IsLeftover(string name, out int? pid)
    {
        pid = null;
        var m = StagingPattern().Match(name);
        if (!m.Success) m = TempPattern().Match(name);
        if (!m.Success) return false;
        if (m.Groups[1].Success && int.TryParse(m.Groups[1].Value, NumberStyles.None, CultureInfo.InvariantCulture, out var p)) pid = p;
        return true;
    }

    /// <summary>
    /// Removes the unfinished writes directly in <paramref name="folder"/> whose writer is no longer running (or, with
    /// <paramref name="folderIsOwned"/>, any: the caller holds the folder's lock, so no other process writes there).
    /// Each removal is reported through <paramref name="log"/>; returns the paths removed. Nothing else is touched.
    /// </summary>
    public static IReadOnlyList<string> Clean(string folder, bool folderIsOwned, Action<string>? log = null)
    {
        var removed = new List<string>();
        if (!Directory.Exists(folder)) return removed;
        foreach (var entry in Directory.EnumerateFileSystemEntries(folder).ToList())
        {
            if (!IsLeftover(Path.GetFileName(entry), out var pid)) continue;
            if (pid == Environment.ProcessId) continue;
            if (pid is int owner && ProcessLiveness.IsRunning(owner)) continue;
            if (pid is null && !folderIsOwned) continue;
            try
            {
                if (Directory.Exists(entry) && !File.GetAttributes(entry).HasFlag(FileAttributes.ReparsePoint)) Directory.Delete(entry, recursive: true);
                else File.Delete(entry);
                removed.Add(entry);
                log?.Invoke($"removed {entry} (left by an interrupted write{(pid is int p ? $" of process {p}" : "")})");
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                log?.Invoke($"could not remove leftover {entry}: {e.Message}");
            }
        }
        return removed;
    }
}
