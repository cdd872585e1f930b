namespace QLora.Quant;

/// <summary>
/// An output folder written under a temporary name beside its final one and moved into place only when complete, so a
/// crash or an error never leaves a half-written model folder under the final name. An existing folder is replaced only
/// when asked, and only after the new one is complete (the old one is moved aside first).
/// </summary>
public sealed class StagedFolder : IDisposable
{
    private bool _committed;

    private StagedFolder(string target, string path)
    {
        Target = target;
        Path = path;
    }

    /// <summary>The final folder.</summary>
    public string Target { get; }

    /// <summary>The temporary folder to write into.</summary>
    public string Path { get; }

    /// <summary>
    /// Starts writing <paramref name="outputDir"/>; refuses an existing non-empty folder unless <paramref name="overwrite"/>,
    /// and a path that is a file, with an <see cref="IOException"/> saying what to do.
    /// </summary>
    public static StagedFolder Create(string outputDir, bool overwrite)
    {
        if (File.Exists(outputDir)) throw new IOException($"{outputDir}: is a file; the output must be a folder");
        if (!overwrite && Directory.Exists(outputDir) && Directory.EnumerateFileSystemEntries(outputDir).Any())
            throw new IOException($"{outputDir}: output folder exists and is not empty; pass --overwrite to replace it, or choose another --output");
        var full = System.IO.Path.GetFullPath(outputDir.TrimEnd(System.IO.Path.DirectorySeparatorChar, System.IO.Path.AltDirectorySeparatorChar));
        var staging = WriteLeftovers.StagingPathFor(full);
        Directory.CreateDirectory(staging);
        return new StagedFolder(full, staging);
    }

    /// <summary>
    /// Removes unfinished writes (staging folders, temporary files) that processes no longer running left beside
    /// <paramref name="output"/>, logging each; a live writer's and anything not named as the project's are kept.
    /// </summary>
    public static void CleanLeftoversBeside(string output, Action<string>? log)
    {
        var parent = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(output.TrimEnd(System.IO.Path.DirectorySeparatorChar, System.IO.Path.AltDirectorySeparatorChar)));
        if (parent is not null) WriteLeftovers.Clean(parent, folderIsOwned: false, log);
    }

    /// <summary>Moves the finished folder into place (swapping out an existing one).</summary>
    public void Commit()
    {
        if (Directory.Exists(Target))
        {
            var old = Path + ".old";
            FileReplace.MoveDirectory(Target, old);
            FileReplace.MoveDirectory(Path, Target);
            FileReplace.DeleteDirectory(old);
        }
        else FileReplace.MoveDirectory(Path, Target);
        _committed = true;
    }

    /// <summary>Deletes the temporary folder unless it was committed.</summary>
    public void Dispose()
    {
        if (_committed) return;
        try { if (Directory.Exists(Path)) Directory.Delete(Path, recursive: true); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }
}
