using System.Globalization;

namespace QLora.Trainer;

/// <summary>
/// How much memory this machine can give a new job now: Linux's <c>MemAvailable</c> (free plus reclaimable cache),
/// capped by the cgroup's limit when the process runs in a container; Windows: available physical memory
/// (<c>GlobalMemoryStatusEx</c>: free and standby pages); elsewhere what .NET reports as available to it.
/// The trainer compares a job's planned peak with this when no Memory:Budget is set.
/// </summary>
public static class AvailableMemory
{
    /// <summary>Bytes available, or null where it cannot be told.</summary>
    public static long? Bytes()
    {
        long? available = OperatingSystem.IsWindows() ? WindowsMemory.AvailablePhysicalBytes() : MemInfo("MemAvailable:");
        var limit = CgroupRoom();
        if (limit is long l) available = available is long a ? Math.Min(a, l) : l;
        if (available is null)
        {
            long total = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
            if (total > 0) available = total;
        }
        return available;
    }

    static long? MemInfo(string key)
    {
        try
        {
            if (!File.Exists("/proc/meminfo")) return null;
            foreach (var line in File.ReadLines("/proc/meminfo"))
            {
                if (!line.StartsWith(key, StringComparison.Ordinal)) continue;
                var parts = line[key.Length..].Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries);
                return long.Parse(parts[0], CultureInfo.InvariantCulture) * 1024;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException) { }
        return null;
    }

    // cgroup v2: memory.max minus memory.current of this process's group ("max" means no limit).
    static long? CgroupRoom()
    {
        try
        {
            const string max = "/sys/fs/cgroup/memory.max", current = "/sys/fs/cgroup/memory.current";
            if (!File.Exists(max) || !File.Exists(current)) return null;
            var m = File.ReadAllText(max).Trim();
            if (m == "max") return null;
            return Math.Max(0, long.Parse(m, CultureInfo.InvariantCulture) - long.Parse(File.ReadAllText(current).Trim(), CultureInfo.InvariantCulture));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException) { return null; }
    }
}
