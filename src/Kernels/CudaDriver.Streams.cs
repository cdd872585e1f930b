namespace QLora.Kernels;

/// <summary>
/// Streams, stream-ordered host → device copies and page-locked host memory: what layer streaming needs to copy the
/// next layer's 4-bit weights on a stream of the project's own while torch computes on the legacy default stream.
/// Symbols are resolved on first use, so a driver that lacks one fails only the call that needs it.
/// </summary>
public sealed unsafe partial class CudaDriver
{
    /// <summary><c>CU_STREAM_NON_BLOCKING</c>: a stream that does not synchronize implicitly with the legacy default stream.</summary>
    public const uint StreamNonBlocking = 1;
    /// <summary><c>CU_EVENT_DISABLE_TIMING</c>: an event used only for ordering and waiting (cheaper to record and wait on).</summary>
    public const uint EventDisableTiming = 2;

    private delegate* unmanaged<nint*, uint, int> _cuStreamCreate;
    private delegate* unmanaged<nint, int> _cuStreamDestroy;
    private delegate* unmanaged<nint, nint, uint, int> _cuStreamWaitEvent;
    private delegate* unmanaged<ulong, void*, nuint, nint, int> _cuMemcpyHtoDAsync;
    private delegate* unmanaged<void*, ulong, nuint, nint, int> _cuMemcpyDtoHAsync;
    private delegate* unmanaged<void**, nuint, uint, int> _cuMemHostAlloc;
    private delegate* unmanaged<void*, int> _cuMemFreeHost;
    private delegate* unmanaged<nint, int> _cuEventQuery;

    /// <summary><c>CUDA_ERROR_NOT_READY</c>: the work an event or stream waits for has not completed yet.</summary>
    public const int ErrorNotReady = 600;

    /// <summary>Creates a stream in the current context (<paramref name="flags"/>: e.g. <see cref="StreamNonBlocking"/>).</summary>
    public nint CreateStream(uint flags)
    {
        if (_cuStreamCreate == null) _cuStreamCreate = (delegate* unmanaged<nint*, uint, int>)Symbol("cuStreamCreate");
        nint s;
        Check(_cuStreamCreate(&s, flags), "cuStreamCreate");
        return s;
    }

    /// <summary>Destroys a stream (work already queued on it still completes).</summary>
    public void DestroyStream(nint stream)
    {
        if (_cuStreamDestroy == null) _cuStreamDestroy = (delegate* unmanaged<nint, int>)Symbol("cuStreamDestroy_v2");
        Check(_cuStreamDestroy(stream), "cuStreamDestroy");
    }

    /// <summary>Makes work queued on <paramref name="stream"/> after this call wait until <paramref name="ev"/> has completed (on the device; the host does not wait).</summary>
    public void StreamWaitEvent(nint stream, nint ev)
    {
        if (_cuStreamWaitEvent == null) _cuStreamWaitEvent = (delegate* unmanaged<nint, nint, uint, int>)Symbol("cuStreamWaitEvent");
        Check(_cuStreamWaitEvent(stream, ev, 0), "cuStreamWaitEvent");
    }

    /// <summary>Queues a host → device copy on <paramref name="stream"/>; <paramref name="source"/> must be page-locked (<see cref="AllocateHost"/>) for the copy to be asynchronous, and must stay unchanged until the copy has completed.</summary>
    public void CopyToDeviceAsync(ulong destination, void* source, long bytes, nint stream)
    {
        if (_cuMemcpyHtoDAsync == null) _cuMemcpyHtoDAsync = (delegate* unmanaged<ulong, void*, nuint, nint, int>)Symbol("cuMemcpyHtoDAsync_v2");
        Check(_cuMemcpyHtoDAsync(destination, source, (nuint)bytes, stream), "cuMemcpyHtoDAsync");
    }

    /// <summary>Queues a device → host copy on <paramref name="stream"/>; <paramref name="destination"/> must be page-locked for the copy to be asynchronous.</summary>
    public void CopyToHostAsync(void* destination, ulong source, long bytes, nint stream)
    {
        if (_cuMemcpyDtoHAsync == null) _cuMemcpyDtoHAsync = (delegate* unmanaged<void*, ulong, nuint, nint, int>)Symbol("cuMemcpyDtoHAsync_v2");
        Check(_cuMemcpyDtoHAsync(destination, source, (nuint)bytes, stream), "cuMemcpyDtoHAsync");
    }

    /// <summary>Allocates page-locked host memory the device can copy from asynchronously (pair with <see cref="FreeHost"/>).</summary>
    public nint AllocateHost(long bytes)
    {
        if (_cuMemHostAlloc == null) _cuMemHostAlloc = (delegate* unmanaged<void**, nuint, uint, int>)Symbol("cuMemHostAlloc");
        void* p;
        Check(_cuMemHostAlloc(&p, (nuint)Math.Max(bytes, 1), 0), $"cuMemHostAlloc({bytes})");
        return (nint)p;
    }

    /// <summary>Frees memory from <see cref="AllocateHost"/>.</summary>
    public void FreeHost(nint pointer)
    {
        if (_cuMemFreeHost == null) _cuMemFreeHost = (delegate* unmanaged<void*, int>)Symbol("cuMemFreeHost");
        Check(_cuMemFreeHost((void*)pointer), "cuMemFreeHost");
    }

    /// <summary>Creates an event with <paramref name="flags"/> (e.g. <see cref="EventDisableTiming"/>).</summary>
    public nint CreateEvent(uint flags)
    {
        nint e;
        Check(_cuEventCreate(&e, flags), "cuEventCreate");
        return e;
    }

    /// <summary>Blocks the calling thread until the work recorded before <paramref name="ev"/> has completed.</summary>
    public void SynchronizeEvent(nint ev) => Check(_cuEventSynchronize(ev), "cuEventSynchronize");

    /// <summary>
    /// Whether the work recorded before <paramref name="ev"/> has completed, without blocking (a host thread that must
    /// give up after a timeout polls this instead of <see cref="SynchronizeEvent"/>).
    /// </summary>
    public bool QueryEvent(nint ev)
    {
        if (_cuEventQuery == null) _cuEventQuery = (delegate* unmanaged<nint, int>)Symbol("cuEventQuery");
        int r = _cuEventQuery(ev);
        if (r == ErrorNotReady) return false;
        Check(r, "cuEventQuery");
        return true;
    }
}
