using System.Diagnostics;
using QLora.Kernels;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// An NCCL communicator over the ranks' CUDA devices, for summing the LoRA gradients device to device (no copy through
/// host memory). Rank 0 creates NCCL's unique id and sends it over MPI, every rank joins on the CUDA device its model
/// lives on, and each all-reduce is queued on the legacy default stream (torch's), so it runs after the backward that
/// produced the gradients and before anything that reads them. The host then polls the stream and the communicator's
/// asynchronous error until the sum is done, so a rank that died or hung makes the others fail after the collective
/// timeout (the communicator is aborted) instead of waiting for ever, as with MPI.
/// </summary>
public sealed class NcclCommunicator : IDisposable
{
    readonly NcclLibrary _nccl;
    readonly Action _makeCurrent;
    readonly Func<Func<bool>> _fence;
    readonly Action? _release;
    nint _comm;
    bool _broken;
    bool _released;

    NcclCommunicator(NcclLibrary nccl, nint comm, int rank, int ranks, Action makeCurrent, Func<Func<bool>> fence, Action? release)
    {
        (_nccl, _comm, Rank, WorldSize, _makeCurrent, _fence, _release) = (nccl, comm, rank, ranks, makeCurrent, fence, release);
    }

    /// <summary>This rank.</summary>
    public int Rank { get; }
    /// <summary>The number of ranks.</summary>
    public int WorldSize { get; }
    /// <summary>The engine in words (e.g. "NCCL 2.27.5").</summary>
    public string Description => $"NCCL {_nccl.Version}";
    /// <summary>The NCCL library file (or name) in use.</summary>
    public string Source => _nccl.Source;
    /// <summary>How long an all-reduce may take before the job is declared broken.</summary>
    public TimeSpan Timeout { get; set; } = TimeSpan.FromMinutes(10);

    /// <summary>
    /// Sets up NCCL among <paramref name="ranks"/> for CUDA device <paramref name="ordinal"/>, or returns null (saying why
    /// through <paramref name="log"/> on rank 0) when any rank cannot load NCCL or <c>QLORA_NCCL=off</c>: every rank then
    /// agrees to sum through host memory. Every rank must call this at the same point.
    /// </summary>
    public static NcclCommunicator? Join(DataParallel ranks, int ordinal, Action<string>? log)
    {
        var nccl = NcclLibrary.TryLoad(Runtime.LibTorchPreload.Current?.Directory is { } dir ? [dir] : [], out var reason);
        var driver = CudaDriver.Shared;
        int device = driver.Device(ordinal);
        nint context = driver.RetainPrimaryContext(device);
        nint ev = 0;
        try
        {
            var joined = Join(ranks, nccl, reason, () => driver.SetCurrentContext(context), () =>
            {
                if (ev == 0) ev = driver.CreateEvent(CudaDriver.EventDisableTiming);
                driver.RecordEvent(ev, 0);
                return () => driver.QueryEvent(ev);
            }, () =>
            {
                if (ev != 0) driver.DestroyEvent(ev);
                driver.ReleasePrimaryContext(device);
            }, log);
            if (joined is null) driver.ReleasePrimaryContext(device);
            return joined;
        }
        catch
        {
            driver.ReleasePrimaryContext(device);
            throw;
        }
    }

    /// <summary>
    /// <see cref="Join(DataParallel, int, Action{string}?)"/> with its device parts given: <paramref name="makeCurrent"/>
    /// makes the rank's device current on this thread, <paramref name="fence"/> marks the work queued so far and returns
    /// whether it has completed, <paramref name="release"/> frees what they hold. Tests give host stand-ins.
    /// </summary>
    internal static NcclCommunicator? Join(DataParallel ranks, NcclLibrary? nccl, string? reason, Action makeCurrent, Func<Func<bool>> fence,
        Action? release, Action<string>? log)
    {
        Span<double> loaded = [nccl is null ? 0 : 1];
        ranks.Sum(loaded, "whether every rank can load NCCL");
        if (loaded[0] < ranks.WorldSize)
        {
            // Each rank says why it has none; the ranks that have it say who lacks it.
            log?.Invoke(nccl is null
                ? $"rank {ranks.Rank}: no NCCL ({reason}); the LoRA gradients are summed through host memory over MPI"
                : $"{ranks.WorldSize - (int)loaded[0]} of {ranks.WorldSize} ranks cannot load NCCL; the LoRA gradients are summed through host memory over MPI");
            return null;
        }
        var id = ranks.OnRoot(() => Convert.ToBase64String(nccl!.NewUniqueId()), "creating the NCCL unique id")!;
        makeCurrent();
        nint comm = nccl!.InitRank(ranks.WorldSize, Convert.FromBase64String(id), ranks.Rank);
        if (ranks.IsRoot) log?.Invoke($"the LoRA gradients are summed device to device with NCCL {nccl.Version} ({nccl.Source}) over {ranks.WorldSize} ranks");
        return new NcclCommunicator(nccl, comm, ranks.Rank, ranks.WorldSize, makeCurrent, fence, release);
    }

    /// <summary>
    /// Replaces <paramref name="buffer"/> (contiguous float32 on this rank's device) by its sum over all ranks, in place,
    /// and returns when the sum is done.
    /// </summary>
    /// <exception cref="CollectiveTimeoutException">The sum did not complete within <see cref="Timeout"/>.</exception>
    /// <exception cref="NcclException">NCCL reported an error (a peer failed, a network error).</exception>
    public void AllReduceSum(Tensor buffer, string what)
    {
        ObjectDisposedException.ThrowIf(_comm == 0, this);
        if (buffer.dtype != ScalarType.Float32) throw new ArgumentException($"the NCCL gradient sum takes float32, not {buffer.dtype}", nameof(buffer));
        _makeCurrent();
        nint p = TensorMemory.DataPointer(buffer);
        _nccl.AllReduceSumFloat32(p, p, buffer.numel(), _comm, 0);
        var done = _fence();
        var clock = Stopwatch.StartNew();
        while (true)
        {
            int state = _nccl.AsyncError(_comm);
            if (state is not (NcclLibrary.Success or NcclLibrary.InProgress))
            {
                Abort();
                throw new NcclException($"ncclAllReduce ({what}) on rank {Rank}", state, _nccl.ErrorString(state));
            }
            if (done()) return;
            if (clock.Elapsed > Timeout)
            {
                Abort();
                throw new CollectiveTimeoutException($"rank {Rank}: the NCCL all-reduce of {what} did not complete within {Timeout.TotalSeconds:0.###} s " +
                    "(a rank died, hung or was stopped); stopping");
            }
            Thread.Sleep(clock.ElapsedMilliseconds < 10 ? 0 : 1);
        }
    }

    void Abort()
    {
        _broken = true;
        if (_comm != 0) _nccl.Abort(_comm);
        _comm = 0;
    }

    /// <summary>Frees the communicator (destroyed after its queued work when healthy, aborted after a failure).</summary>
    public void Dispose()
    {
        if (_comm != 0)
        {
            if (_broken) _nccl.Abort(_comm);
            else _nccl.Destroy(_comm);
            _comm = 0;
        }
        if (!_released) _release?.Invoke();
        _released = true;
    }
}
