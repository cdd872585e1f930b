using System.Runtime.InteropServices;

namespace QLora.Trainer;

/// <summary>
/// The Windows sources of the memory figures that Linux gives through <c>/proc</c>: this process's counters
/// (<c>GetProcessMemoryInfo</c>) and the machine's available physical memory (<c>GlobalMemoryStatusEx</c>). Both are
/// plain kernel32 calls that allocate nothing, cheap enough for the peak sampler's millisecond loop.
/// </summary>
internal static partial class WindowsMemory
{
    /// <summary>
    /// Private bytes (<c>PrivateUsage</c>: the commit charge of memory only this process can use): tensors, optimizer
    /// state in RAM, the managed heap. Like Linux's RssAnon it leaves out memory-mapped files (checkpoints, paged
    /// optimizer state), the split the planner predicts; unlike RssAnon it counts committed pages not yet touched or
    /// paged out, so it can read somewhat higher. Wine 8 reports no private bytes (0): there the working set stands in,
    /// which also counts mapped files and so reads higher.
    /// </summary>
    public static long PrivateBytes() => Counters() is { } c ? (long)(c.PrivateUsage > 0 ? c.PrivateUsage : c.WorkingSetSize) : 0;

    /// <summary>The working set: every page resident now (private, mapped files and shared DLLs), as VmRSS.</summary>
    public static long WorkingSetBytes() => Counters() is { } c ? (long)c.WorkingSetSize : 0;

    /// <summary>The largest working set since the process started, as VmHWM.</summary>
    public static long PeakWorkingSetBytes() => Counters() is { } c ? (long)c.PeakWorkingSetSize : 0;

    /// <summary>Physical memory available to a new job now (free + standby list), or null when the call fails.</summary>
    public static long? AvailablePhysicalBytes()
    {
        var status = new MemoryStatusEx { Length = (uint)Marshal.SizeOf<MemoryStatusEx>() };
        return GlobalMemoryStatusEx(ref status) ? (long)status.AvailPhys : null;
    }

    static ProcessMemoryCounters? Counters()
    {
        var c = new ProcessMemoryCounters { Size = (uint)Marshal.SizeOf<ProcessMemoryCounters>() };
        return GetProcessMemoryInfo(CurrentProcess, ref c, c.Size) ? c : null;
    }

    static readonly IntPtr CurrentProcess = -1; // GetCurrentProcess()'s pseudo-handle

    [StructLayout(LayoutKind.Sequential)]
    struct ProcessMemoryCounters // PROCESS_MEMORY_COUNTERS_EX
    {
        public uint Size;
        public uint PageFaultCount;
        public nuint PeakWorkingSetSize;
        public nuint WorkingSetSize;
        public nuint QuotaPeakPagedPoolUsage;
        public nuint QuotaPagedPoolUsage;
        public nuint QuotaPeakNonPagedPoolUsage;
        public nuint QuotaNonPagedPoolUsage;
        public nuint PagefileUsage;
        public nuint PeakPagefileUsage;
        public nuint PrivateUsage;
    }

    [StructLayout(LayoutKind.Sequential)]
    struct MemoryStatusEx // MEMORYSTATUSEX
    {
        public uint Length;
        public uint MemoryLoad;
        public ulong TotalPhys;
        public ulong AvailPhys;
        public ulong TotalPageFile;
        public ulong AvailPageFile;
        public ulong TotalVirtual;
        public ulong AvailVirtual;
        public ulong AvailExtendedVirtual;
    }

    [LibraryImport("kernel32.dll", EntryPoint = "K32GetProcessMemoryInfo")]
    [return: MarshalAs(UnmanagedType.Bool)]
    private static partial bool GetProcessMemoryInfo(IntPtr process, ref ProcessMemoryCounters counters, uint size);

    [LibraryImport("kernel32.dll")]
    [return: MarshalAs(UnmanagedType.Bool)]
    private static partial bool GlobalMemoryStatusEx(ref MemoryStatusEx status);
}
