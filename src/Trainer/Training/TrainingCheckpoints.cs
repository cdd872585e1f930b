using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.RegularExpressions;
using QLora.Quant;

namespace QLora.Trainer;

/// <summary>
/// The checkpoints of a run (<c>&lt;output&gt;/checkpoints/checkpoint-NNNNNN</c>): each is written into a temporary
/// folder, sealed by a manifest of its files' sizes and SHA-256 digests written last, and renamed into place, so a
/// process killed at any moment leaves either a complete checkpoint or none. A folder whose manifest is missing or does
/// not match its files is refused with the reason; "latest" is the newest checkpoint that verifies.
/// </summary>
public sealed partial class TrainingCheckpoints(string checkpointsDir, int keepLast)
{
    /// <summary>The manifest's name.</summary>
    public const string ManifestFile = "checkpoint_manifest.json";

    /// <summary>The folder that holds the checkpoints.</summary>
    public string Folder { get; } = checkpointsDir;

    [GeneratedRegex(@"^checkpoint-(\d+)$")]
    private static partial Regex NamePattern();

    /// <summary>Writes checkpoint <paramref name="step"/>: <paramref name="write"/> fills the given folder; then it is sealed and moved into place, and older ones beyond the newest K are deleted.</summary>
    public string Save(int step, Action<string> write)
    {
        Directory.CreateDirectory(Folder);
        var target = Path.Combine(Folder, $"checkpoint-{step.ToString("D6", CultureInfo.InvariantCulture)}");
        using (var staged = StagedFolder.Create(target, overwrite: true))
        {
            write(staged.Path);
            var files = Directory.GetFiles(staged.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal)
                .ToDictionary(f => f!, f => new ManifestEntry(new FileInfo(Path.Combine(staged.Path, f!)).Length, Digest(Path.Combine(staged.Path, f!))));
            var manifest = JsonSerializer.Serialize(new Manifest(step, files), new JsonSerializerOptions { WriteIndented = true, NewLine = "\n" });
            AtomicFile.WriteAllBytes(Path.Combine(staged.Path, ManifestFile), System.Text.Encoding.UTF8.GetBytes(manifest));
            staged.Commit();
        }
        foreach (var old in List().Skip(keepLast)) FileReplace.DeleteDirectory(old.Path);
        return target;
    }

    /// <summary>The checkpoints present, newest first (not verified).</summary>
    public IReadOnlyList<(int Step, string Path)> List()
    {
        if (!Directory.Exists(Folder)) return [];
        return Directory.GetDirectories(Folder)
            .Select(d => (Match: NamePattern().Match(Path.GetFileName(d)), Path: d))
            .Where(x => x.Match.Success)
            .Select(x => (int.Parse(x.Match.Groups[1].Value, CultureInfo.InvariantCulture), x.Path))
            .OrderByDescending(x => x.Item1).ToList();
    }

    /// <summary>Why <paramref name="folder"/> is not a complete checkpoint, or null when it verifies.</summary>
    public static string? Verify(string folder)
    {
        if (!Directory.Exists(folder)) return $"{folder} does not exist";
        var manifestPath = Path.Combine(folder, ManifestFile);
        if (!File.Exists(manifestPath)) return $"{folder} has no {ManifestFile} (it was not completely written)";
        Manifest? manifest;
        try { manifest = JsonSerializer.Deserialize<Manifest>(File.ReadAllText(manifestPath)); }
        catch (JsonException e) { return $"{manifestPath} is damaged ({e.Message})"; }
        if (manifest?.Files is null || manifest.Files.Count == 0) return $"{manifestPath} lists no files";
        foreach (var (name, entry) in manifest.Files)
        {
            var path = Path.Combine(folder, name);
            if (!File.Exists(path)) return $"{folder}: {name} is missing";
            long length = new FileInfo(path).Length;
            if (length != entry.Bytes) return $"{folder}: {name} has {length} bytes, the manifest says {entry.Bytes} (truncated or replaced)";
            if (Digest(path) != entry.Sha256) return $"{folder}: {name} does not match its SHA-256 in the manifest (corrupted)";
        }
        return null;
    }

    /// <summary>The newest checkpoint that verifies; each newer damaged one is reported through <paramref name="warn"/>.</summary>
    public string? Latest(Action<string>? warn = null)
    {
        foreach (var (_, path) in List())
        {
            var problem = Verify(path);
            if (problem is null) return path;
            warn?.Invoke($"skipping damaged checkpoint: {problem}");
        }
        return null;
    }

    static string Digest(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }

    sealed record ManifestEntry(long Bytes, string Sha256);
    sealed record Manifest(int Step, Dictionary<string, ManifestEntry> Files);
}
