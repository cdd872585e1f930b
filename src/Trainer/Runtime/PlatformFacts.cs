using System.Runtime.InteropServices;
using QLora.Quant;

namespace QLora.Trainer.Runtime;

/// <summary>One operating-system fact that changes how the trainer behaves here, for <c>qlora doctor</c>.</summary>
public sealed record PlatformFact(string Name, string Value);

/// <summary>
/// How each operating-system difference is handled on this machine (memory figures, native heap, stop signals, file
/// replacement; on Windows also whether it is Wine), so a user on Windows can see which path is in force.
/// </summary>
public static class PlatformFacts
{
    /// <summary>The facts for this process.</summary>
    public static IReadOnlyList<PlatformFact> Collect()
    {
        bool windows = OperatingSystem.IsWindows();
        var facts = new List<PlatformFact>
        {
            new("memory", ResidentMemory.Source + $"; this process now: {Mib(ResidentMemory.AnonymousBytes())} anonymous (private), {Mib(ResidentMemory.ResidentBytes())} resident"
                + (AvailableMemory.Bytes() is long a ? $"; {a / (1024.0 * 1024 * 1024):F1} GiB available to a new job" : "")),
            new("native heap", windows ? "Windows process heap: large freed blocks go back to the OS, no policy needed"
                : OperatingSystem.IsLinux() ? "glibc malloc: qlora train sets a 1 MB mmap threshold and 2 arenas (mallopt)" : "system allocator, no policy"),
            new("stop", windows
                ? $"Ctrl-C, Ctrl-Break, console close, shutdown: checkpoint and exit (close and shutdown: within {StopGraceSeconds} s, then Windows ends the process)"
                : "Ctrl-C (SIGINT), Ctrl-\\ (SIGQUIT), SIGTERM, SIGHUP: checkpoint and exit"),
            new("replace", windows
                ? $"MoveFileEx over the target, retried for up to {FileReplace.Backoff.Sum(t => t.TotalSeconds):0.#} s while another program holds it"
                : "rename(2) over the target, atomic"),
        };
        if (windows && WineVersion() is { } wine) facts.Add(new("wine", $"running under Wine {wine}, which is not Windows (README, \"Windows\": what was tested under Wine)"));
        return facts;
    }

    static string Mib(long bytes) => $"{bytes / (1024.0 * 1024):F0} MiB";

    /// <summary>The seconds a Windows close or shutdown handler waits for the checkpoint (the Cli's StopSignals).</summary>
    public const double StopGraceSeconds = 4.5;

    /// <summary>Wine's version when this Windows process runs under Wine (ntdll exports <c>wine_get_version</c>), else null.</summary>
    public static string? WineVersion()
    {
        if (!OperatingSystem.IsWindows() || !NativeLibrary.TryLoad("ntdll.dll", out var ntdll)) return null;
        if (!NativeLibrary.TryGetExport(ntdll, "wine_get_version", out var export)) return null;
        unsafe { return Marshal.PtrToStringUTF8(((delegate* unmanaged<IntPtr>)export)()); }
    }

    /// <summary>
    /// The loaded modules whose file names are in <paramref name="names"/> (Windows, where there is no /proc/self/maps),
    /// full paths, sorted.
    /// </summary>
    public static IReadOnlyList<string> LoadedModules(IReadOnlySet<string> names)
    {
        using var self = System.Diagnostics.Process.GetCurrentProcess();
        return self.Modules.Cast<System.Diagnostics.ProcessModule>().Select(m => m.FileName)
            .Where(f => names.Contains(Path.GetFileName(f), StringComparer.OrdinalIgnoreCase)).Distinct(StringComparer.OrdinalIgnoreCase)
            .Order(StringComparer.OrdinalIgnoreCase).ToList();
    }
}
