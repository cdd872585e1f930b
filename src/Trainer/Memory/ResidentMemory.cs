using System.Globalization;

namespace QLora.Trainer;

/// <summary>
/// The process's resident memory as Linux reports it in <c>/proc/self/status</c>. On the CPU backend "device memory"
/// is resident anonymous memory (<c>RssAnon</c>): tensors, optimizer state in RAM; memory-mapped checkpoint files and
/// paged optimizer files are file-backed and not counted, which is exactly the split the memory planner predicts.
/// </summary>
public static class ResidentMemory
{
    /// <summary>True where <c>/proc/self/status</c> exists (Linux); elsewhere the readers return 0.</summary>
    public static bool IsSupported => File.Exists("/proc/self/status");

    /// <summary>Resident anonymous memory now, in bytes (0 where unsupported).</summary>
    public static long AnonymousBytes() => ReadField("RssAnon:");

    /// <summary>Total resident memory now (anonymous + file-backed + shared), in bytes.</summary>
    public static long ResidentBytes() => ReadField("VmRSS:");

    /// <summary>The kernel's high-water mark of total resident memory since the process started, in bytes.</summary>
    public static long PeakResidentBytes() => ReadField("VmHWM:");

    static long ReadField(string name)
    {
        if (!IsSupported) return 0;
        foreach (var line in File.ReadLines("/proc/self/status"))
        {
            if (!line.StartsWith(name, StringComparison.Ordinal)) continue;
            var parts = line[name.Length..].Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries);
            long kb = long.Parse(parts[0], CultureInfo.InvariantCulture);
            return kb * 1024;
        }
        return 0;
    }
}
