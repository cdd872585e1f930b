using System.Globalization;
using System.Text;
using System.Text.Json;
using QLora.Quant;

namespace QLora.Trainer;

/// <summary>
/// Ownership of a training output folder: <c>&lt;Output:Dir&gt;/.qlora.lock</c> records the owner's process id, host
/// and start time while a run writes there, so a second run into the same folder is refused instead of interleaving its
/// logs or deleting the first one's checkpoints. A lock whose process is gone (killed, crashed) is stale and taken over
/// with a log line. Released (the file deleted) when disposed or when the process exits.
/// </summary>
public sealed class OutputFolderLock : IDisposable
{
    /// <summary>The lock file's name inside the output folder.</summary>
    public const string FileName = ".qlora.lock";

    static readonly List<OutputFolderLock> Held = [];

    readonly string _path;
    readonly string _content;
    readonly bool _createdFolder;
    bool _released;

    OutputFolderLock(string folder, string path, string content, bool createdFolder)
    {
        Folder = folder;
        _path = path;
        _content = content;
        _createdFolder = createdFolder;
        AppDomain.CurrentDomain.ProcessExit += OnExit;
        lock (Held) Held.Add(this);
    }

    /// <summary>The locked folder.</summary>
    public string Folder { get; }

    /// <summary>What a lock file records.</summary>
    public sealed record Owner(int Pid, string Host, DateTime? StartedUtc, DateTime LockedUtc);

    /// <summary>
    /// Takes the folder (creating it if needed). Refuses with an <see cref="IOException"/> naming the owner when another
    /// live process holds it, or when <paramref name="folder"/> is a file; takes over a stale lock, saying so through
    /// <paramref name="log"/>.
    /// </summary>
    public static OutputFolderLock Acquire(string folder, string optionName = "Output:Dir", Action<string>? log = null)
    {
        folder = Path.GetFullPath(folder);
        if (File.Exists(folder)) throw new IOException($"{optionName} {folder} is a file; it must be a folder (or a path that does not exist yet)");
        bool created = !Directory.Exists(folder);
        Directory.CreateDirectory(folder);
        var path = Path.Combine(folder, FileName);
        var me = new Owner(Environment.ProcessId, Environment.MachineName, ProcessLiveness.CurrentStartTimeUtc(), DateTime.UtcNow);
        var content = JsonSerializer.Serialize(me);
        for (int attempt = 0; attempt < 5; attempt++)
        {
            try
            {
                using (var s = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None))
                {
                    s.Write(Encoding.UTF8.GetBytes(content));
                    s.Flush(flushToDisk: true);
                }
                return new OutputFolderLock(folder, path, content, created);
            }
            catch (IOException) when (File.Exists(path))
            {
                var (owner, raw) = Read(path);
                if (owner is not null && owner.Host != Environment.MachineName)
                    throw new IOException($"{optionName} {folder} is in use by process {owner.Pid} on host {owner.Host} (since {Stamp(owner.LockedUtc)}); " +
                        $"wait for that run to finish or choose another {optionName}. If no run is using it, delete {path}");
                if (owner is not null && ProcessLiveness.IsRunning(owner.Pid, owner.StartedUtc))
                    throw new IOException($"{optionName} {folder} is in use by process {owner.Pid} on this host (since {Stamp(owner.LockedUtc)}); " +
                        $"wait for that run to finish or choose another {optionName}");
                if (owner is null && raw is null) continue; // removed meanwhile: try again
                // Stale: take it over by renaming it away (only one contender's rename succeeds).
                var aside = path + $".stale-{Environment.ProcessId}";
                try { File.Move(path, aside); }
                catch (FileNotFoundException) { continue; }
                File.Delete(aside);
                log?.Invoke(owner is null
                    ? $"took over {path}: it was unreadable ({Truncate(raw)})"
                    : $"took over {path}: process {owner.Pid} that held it since {Stamp(owner.LockedUtc)} is no longer running");
            }
        }
        throw new IOException($"{optionName} {folder}: could not take {path}; another run may be starting there");
    }

    /// <summary>The owner recorded in <paramref name="path"/> (null when unreadable) and the raw text (null when the file is gone).</summary>
    public static (Owner? Owner, string? Raw) Read(string path)
    {
        string raw;
        try { raw = File.ReadAllText(path); }
        catch (FileNotFoundException) { return (null, null); }
        catch (IOException) { return (null, ""); }
        try { return (JsonSerializer.Deserialize<Owner>(raw), raw); }
        catch (JsonException) { return (null, raw); }
    }

    static string Stamp(DateTime t) => t.ToString("yyyy-MM-dd HH:mm:ss 'UTC'", CultureInfo.InvariantCulture);
    static string Truncate(string? s) => s is null ? "" : s.Length > 80 ? s[..80] + "…" : s;

    void OnExit(object? sender, EventArgs e) => Release();

    /// <summary>Releases every lock this process holds (before an immediate exit, which runs no handlers).</summary>
    public static void ReleaseAll()
    {
        OutputFolderLock[] all;
        lock (Held) all = [.. Held];
        foreach (var l in all) l.Release();
    }

    void Release()
    {
        lock (Held)
        {
            if (_released) return;
            _released = true;
            Held.Remove(this);
        }
        AppDomain.CurrentDomain.ProcessExit -= OnExit;
        try
        {
            // Only our own lock: a folder taken over meanwhile (it should not be) keeps its new owner's.
            if (File.Exists(_path) && File.ReadAllText(_path) == _content) File.Delete(_path);
            if (_createdFolder && Directory.Exists(Folder) && !Directory.EnumerateFileSystemEntries(Folder).Any()) Directory.Delete(Folder);
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }

    /// <summary>Releases the folder; a folder this lock created and nothing else was written to is removed again.</summary>
    public void Dispose() => Release();
}
