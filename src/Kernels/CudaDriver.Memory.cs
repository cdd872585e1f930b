namespace QLora.Kernels;

/// <summary>
/// Device-memory queries and raw allocations of the driver binding: what <c>nvidia-smi</c> shows as used memory
/// (<c>cuMemGetInfo</c>) and plain <c>cuMemAlloc</c> blocks (used to take part of a large card away so that it behaves
/// like a smaller one). Symbols are resolved on first use, so a driver that lacks one fails only the call that needs it.
/// </summary>
public sealed unsafe partial class CudaDriver
{
    private delegate* unmanaged<nuint*, nuint*, int> _cuMemGetInfo;

    /// <summary>
    /// Free and total bytes of the device of the current context, as the driver counts them: every context and
    /// allocation on the device (other processes' included), the caching allocators' reserved blocks included.
    /// </summary>
    public (long Free, long Total) MemoryInfo()
    {
        if (_cuMemGetInfo == null) _cuMemGetInfo = (delegate* unmanaged<nuint*, nuint*, int>)Symbol("cuMemGetInfo_v2");
        nuint free, total;
        Check(_cuMemGetInfo(&free, &total), "cuMemGetInfo");
        return ((long)free, (long)total);
    }

    /// <summary>Allocates device memory in the current context; returns the raw result (CUDA_ERROR_OUT_OF_MEMORY = 2) instead of throwing.</summary>
    public int TryAllocate(long bytes, out ulong pointer)
    {
        ulong p;
        int r = _cuMemAlloc(&p, (nuint)Math.Max(bytes, 1));
        pointer = r == 0 ? p : 0;
        return r;
    }
}
