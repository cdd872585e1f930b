using System.Runtime.InteropServices;

namespace QLora.Trainer;

/// <summary>
/// The C heap libtorch's CPU tensors come from. glibc's malloc raises its mmap threshold each time a large block is
/// freed (up to 32 MB), after which activation-sized tensors are carved from per-thread arenas whose freed memory
/// stays resident; over a 7B training step that kept ~1.6 GB of freed tensors counted as resident anonymous memory.
/// <see cref="UseLeanPolicy"/> fixes the threshold at 1 MB (larger tensors are mapped and returned to the system on
/// free) and caps the arenas, as PyTorch users do with <c>MALLOC_MMAP_THRESHOLD_</c> / <c>MALLOC_ARENA_MAX</c>.
/// Windows has no such knob and needs none: the CRT's malloc is the process heap, which serves blocks above about
/// 512 KB (every activation-sized tensor) straight from VirtualAlloc and gives them back with VirtualFree on free, so
/// there the policy is a no-op.
/// </summary>
public static partial class NativeHeap
{
    private const int MmapThreshold = -3; // M_MMAP_THRESHOLD
    private const int ArenaMax = -8;      // M_ARENA_MAX

    /// <summary>
    /// Applies the policy (Linux with glibc; elsewhere, Windows included, nothing) and returns whether it took effect. Call it at process
    /// start, before the threads that allocate tensors exist.
    /// </summary>
    public static bool UseLeanPolicy(int mmapThresholdBytes = 1 << 20, int arenas = 2)
    {
        if (!OperatingSystem.IsLinux()) return false;
        try
        {
            return mallopt(MmapThreshold, mmapThresholdBytes) == 1 & mallopt(ArenaMax, arenas) == 1;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return false; // not glibc (e.g. musl): its allocator returns large blocks anyway
        }
    }

    [LibraryImport("libc", EntryPoint = "mallopt")]
    private static partial int mallopt(int param, int value);
}
