namespace QLora.Trainer;

/// <summary>
/// The process's memory as the OS reports it. On the CPU backend "device memory" is anonymous memory: tensors,
/// optimizer state in RAM; memory-mapped checkpoint files and paged optimizer files are file-backed and not counted,
/// which is exactly the split the memory planner predicts. Linux: <c>/proc/self/status</c> (RssAnon, VmRSS, VmHWM).
/// Windows: <c>GetProcessMemoryInfo</c> (private bytes, working set, peak working set; see <see cref="WindowsMemory"/>).
/// </summary>
public static class ResidentMemory
{
    /// <summary>True on Linux (<c>/proc/self/status</c>) and Windows; elsewhere the readers return 0.</summary>
    public static bool IsSupported => OperatingSystem.IsWindows() || File.Exists("/proc/self/status");

    /// <summary>Where the figures come from, in words (for <c>qlora doctor</c>).</summary>
    public static string Source => OperatingSystem.IsWindows() ? "GetProcessMemoryInfo: private bytes (the working set where none are reported, as under Wine), working set"
        : IsSupported ? "/proc/self/status: RssAnon, VmRSS, VmHWM" : "none on this OS";

    /// <summary>Resident anonymous memory now, in bytes (Windows: private bytes; 0 where unsupported).</summary>
    public static long AnonymousBytes() => OperatingSystem.IsWindows() ? WindowsMemory.PrivateBytes() : ReadField("RssAnon:");

    /// <summary>Total resident memory now (anonymous + file-backed + shared), in bytes (Windows: the working set).</summary>
    public static long ResidentBytes() => OperatingSystem.IsWindows() ? WindowsMemory.WorkingSetBytes() : ReadField("VmRSS:");

    /// <summary>The kernel's high-water mark of total resident memory since the process started, in bytes.</summary>
    public static long PeakResidentBytes() => OperatingSystem.IsWindows() ? WindowsMemory.PeakWorkingSetBytes() : ReadField("VmHWM:");

    // The sampler reads this every millisecond or so: a per-thread open handle and buffer, re-read with pread at offset
    // 0 (procfs regenerates the file), keep a read allocation-free, so that measuring does not itself grow the managed
    // heap (File.ReadLines made about 5 KB of garbage per read: tens of MB over a step, all resident until a GC).
    [ThreadStatic] static Microsoft.Win32.SafeHandles.SafeFileHandle? handle;
    [ThreadStatic] static byte[]? buffer;

    static long ReadField(string name)
    {
        if (!IsSupported) return 0;
        handle ??= File.OpenHandle("/proc/self/status");
        buffer ??= new byte[16384];
        int length = RandomAccess.Read(handle, buffer, 0);
        var text = buffer.AsSpan(0, length);
        Span<byte> key = stackalloc byte[32];
        int k = System.Text.Encoding.ASCII.GetBytes(name, key);
        int at = 0;
        while (at < text.Length)
        {
            var line = text[at..];
            int end = line.IndexOf((byte)'\n');
            if (end >= 0) line = line[..end];
            if (line.StartsWith(key[..k]))
            {
                long kb = 0;
                foreach (byte c in line[k..])
                    if (c is >= (byte)'0' and <= (byte)'9') kb = kb * 10 + (c - '0');
                    else if (kb > 0) break;
                return kb * 1024;
            }
            if (end < 0) break;
            at += end + 1;
        }
        return 0;
    }
}
