using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Data-parallel training over a group of ranks (<see cref="ICollectives"/>): every rank holds the same frozen base and
/// adapters, trains on its share of each global step's micro-batches, and after backward the LoRA gradients are summed
/// across ranks in one flat float32 buffer (one all-reduce per step: device to device with NCCL when the ranks train on
/// CUDA and every rank can load it, else staged through host memory over MPI), so clipping and the optimizer step are
/// identical everywhere. Rank 0 alone writes files; what it decides (the output folder, a
/// checkpoint written) is broadcast so every rank continues or stops with the same error. With one rank every method
/// leaves the data as it is: a job run without MPI behaves exactly as before.
/// </summary>
public sealed class DataParallel : IDisposable
{
    readonly Stopwatch _reduceTime = new();
    readonly TimeSpan _timeout;
    NcclCommunicator? _nccl;
    bool _ncclTried;
    bool _finished;

    DataParallel(ICollectives collectives, TimeSpan timeout)
    {
        Collectives = collectives;
        _timeout = timeout;
    }

    /// <summary>The ranks.</summary>
    public ICollectives Collectives { get; }
    /// <summary>This process's rank.</summary>
    public int Rank => Collectives.Rank;
    /// <summary>The number of ranks.</summary>
    public int WorldSize => Collectives.WorldSize;
    /// <summary>Rank 0, the one that writes logs, checkpoints and results.</summary>
    public bool IsRoot => Rank == 0;
    /// <summary>More than one rank.</summary>
    public bool Enabled => WorldSize > 1;
    /// <summary>Time spent in the gradient all-reduce so far (including waiting for the slowest rank).</summary>
    public TimeSpan ReduceTime => _reduceTime.Elapsed;
    /// <summary>Where the ranks say how they exchange gradients (rank 0's lines, and a rank's own reason for having no NCCL).</summary>
    public Action<string>? Log { get; set; }
    /// <summary>The NCCL communicator the gradients go through, once CUDA ranks have set one up; null otherwise.</summary>
    public NcclCommunicator? Nccl => _nccl;

    /// <summary>One process: no MPI is loaded.</summary>
    public static DataParallel Single() => new(SingleProcessCollectives.Instance, TimeSpan.FromMinutes(10));

    /// <summary>Data parallelism over <paramref name="collectives"/> (tests and benchmarks).</summary>
    public static DataParallel Over(ICollectives collectives) => new(collectives, TimeSpan.FromMinutes(10));

    /// <summary>Data parallelism over <paramref name="collectives"/> whose gradients go through <paramref name="nccl"/> whatever their device (tests).</summary>
    internal static DataParallel Over(ICollectives collectives, Func<DataParallel, NcclCommunicator?> nccl)
    {
        var dp = new DataParallel(collectives, TimeSpan.FromMinutes(10));
        dp._nccl = nccl(dp);
        dp._ncclTried = true;
        return dp;
    }

    /// <summary>
    /// The ranks of this job: MPI's world when the process was started by an MPI launcher with more than one rank and
    /// <paramref name="mode"/> is auto, else a single process (nothing MPI is loaded).
    /// </summary>
    public static DataParallel Start(string mode, TimeSpan timeout)
    {
        if (mode.Equals("off", StringComparison.OrdinalIgnoreCase) || !MpiLaunch.IsLaunched || MpiLaunch.AnnouncedWorldSize == 1) return Single();
        var world = MpiCollectives.World;
        world.Timeout = timeout;
        return world.WorldSize > 1 ? new DataParallel(world, timeout) : Single();
    }

    /// <summary>
    /// libtorch threads for this rank when the job does not set them: the machine's cores divided among the ranks the
    /// launcher put on it (0, libtorch's default, for a single process), so ranks do not oversubscribe the cores.
    /// </summary>
    public int DefaultThreads => Enabled && MpiLaunch.LocalSize is int local && local > 1 ? Math.Max(1, Environment.ProcessorCount / local) : 0;

    /// <summary>The seed of this rank's random stream (dropout): the job's seed on rank 0, a distinct one on every other rank.</summary>
    public int RankSeed(int seed) => Rank == 0 ? seed : unchecked(seed * 31 + 1_000_003 * Rank);

    /// <summary>This rank's micro-batches of a global step (<see cref="BatchSharding"/>).</summary>
    public IReadOnlyList<T> Shard<T>(IReadOnlyList<T> microBatches) => BatchSharding.Shard(microBatches, Rank, WorldSize);

    /// <summary>A problem with running <paramref name="microBatchesPerStep"/> micro-batches per step on these ranks, or null.</summary>
    public string? Check(int microBatchesPerStep) => microBatchesPerStep >= WorldSize ? null
        : $"Training:GradientAccumulationSteps = {microBatchesPerStep} with {WorldSize} ranks: it counts the micro-batches of a whole step across all ranks, " +
          $"and every rank needs at least one; set it to a multiple of {WorldSize} (the global batch is MicroBatchSize x GradientAccumulationSteps rows)";

    /// <summary>
    /// Sums the gradients of <paramref name="parameters"/> and the step's scalars across ranks: one float32 all-reduce of
    /// every gradient flattened in parameter order, one float64 all-reduce of (loss sum, stop votes). A parameter
    /// without a gradient on this rank contributes zeros. On CUDA the flat buffer stays on the device and NCCL sums it
    /// (set up at the first step: <see cref="NcclCommunicator.Join(DataParallel, int, Action{string}?)"/>); without
    /// NCCL it is staged through host memory. Returns the global loss sum and whether any rank asked to stop.
    /// </summary>
    public (double LossSum, bool Stop) ReduceGradients(IReadOnlyList<TorchSharp.Modules.Parameter> parameters, double lossSum, bool stopRequested, int step)
    {
        if (!Enabled) return (lossSum, stopRequested);
        _reduceTime.Start();
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            long total = parameters.Sum(p => p.numel());
            var nccl = DeviceCommunicator(parameters);
            var flat = zeros(total, ScalarType.Float32, device: nccl is null ? CPU : parameters[0].device);
            long offset = 0;
            foreach (var p in parameters)
            {
                long n = p.numel();
                using var g = p.grad;
                if (g is not null) flat.narrow(0, offset, n).copy_(g.reshape(n));
                offset += n;
            }
            if (nccl is not null) nccl.AllReduceSum(flat, $"the gradients of step {step}");
            else Collectives.AllReduceSum(MemoryMarshal.Cast<byte, float>(flat.bytes), $"the gradient all-reduce of step {step}");
            offset = 0;
            foreach (var p in parameters)
            {
                long n = p.numel();
                var g = p.grad;
                if (g is null)
                {
                    // This rank's micro-batches never reached the parameter (no target tokens): give it the summed gradient.
                    p.grad = flat.narrow(0, offset, n).view(p.shape).to(p.dtype, p.device).clone();
                }
                else using (g) g.copy_(flat.narrow(0, offset, n).view(g.shape));
                offset += n;
            }
            Span<double> scalars = [lossSum, stopRequested ? 1 : 0];
            Collectives.AllReduceSum(scalars, $"the loss and stop flags of step {step}");
            return (scalars[0], scalars[1] > 0);
        }
        finally
        {
            _reduceTime.Stop();
        }
    }

    /// <summary>
    /// The NCCL communicator for gradients on a CUDA device, set up (or found unavailable, which every rank agrees on)
    /// at the first call; null for gradients on the CPU.
    /// </summary>
    NcclCommunicator? DeviceCommunicator(IReadOnlyList<TorchSharp.Modules.Parameter> parameters)
    {
        if (_ncclTried) return _nccl;
        if (parameters.Count == 0 || parameters[0].device_type != TorchSharp.DeviceType.CUDA) return null;
        _ncclTried = true;
        try
        {
            _nccl = NcclCommunicator.Join(this, Math.Max(0, (int)parameters[0].device.index), Log);
        }
        catch (QLora.Kernels.NcclException e)
        {
            throw new InvalidOperationException($"rank {Rank}: NCCL could not connect the ranks ({e.Message}); set {QLora.Kernels.NcclLibrary.PathVariable}=" +
                $"{QLora.Kernels.NcclLibrary.OffValue} to sum the gradients through host memory over MPI instead", e);
        }
        if (_nccl is not null) _nccl.Timeout = _timeout;
        return _nccl;
    }

    /// <summary>Sums <paramref name="values"/> across ranks in place.</summary>
    public void Sum(Span<double> values, string what)
    {
        if (Enabled) Collectives.AllReduceSum(values, what);
    }

    /// <summary>
    /// Runs <paramref name="action"/> on rank 0 only and gives its result to every rank; when it throws, every other rank
    /// throws the same message (as the same kind of error), so no rank waits for one that has stopped.
    /// </summary>
    public string? OnRoot(Func<string?> action, string what)
    {
        if (!Enabled) return action();
        string? result = null;
        Exception? error = null;
        if (IsRoot)
        {
            try { result = action(); }
            catch (Exception e) { error = e; }
        }
        string payload = error is null ? (result is null ? "n" : "v" + result) : "e" + Kind(error) + error.Message;
        payload = BroadcastString(IsRoot ? payload : "", what);
        if (error is not null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(error);
        return payload[0] switch
        {
            'n' => null,
            'v' => payload[1..],
            _ => throw Rebuild(payload[1], $"rank 0 failed {what}: {payload[2..]}"),
        };
    }

    /// <summary>Every rank's <paramref name="local"/> string, in rank order.</summary>
    public string[] AllGather(string local, string what)
    {
        if (!Enabled) return [local];
        var bytes = Encoding.UTF8.GetBytes(local);
        Span<byte> length = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(length, bytes.Length);
        var lengths = Collectives.AllGather(length, what + " (sizes)");
        int max = Enumerable.Range(0, WorldSize).Max(r => BinaryPrimitives.ReadInt32LittleEndian(lengths.AsSpan(4 * r)));
        var padded = new byte[max];
        bytes.CopyTo(padded, 0);
        var all = Collectives.AllGather(padded, what);
        return [.. Enumerable.Range(0, WorldSize).Select(r => Encoding.UTF8.GetString(all, r * max, BinaryPrimitives.ReadInt32LittleEndian(lengths.AsSpan(4 * r))))];
    }

    /// <summary>Rank 0's <paramref name="value"/> on every rank.</summary>
    public string BroadcastString(string value, string what)
    {
        if (!Enabled) return value;
        var bytes = IsRoot ? Encoding.UTF8.GetBytes(value) : [];
        var length = new byte[8];
        BinaryPrimitives.WriteInt64LittleEndian(length, bytes.Length);
        Collectives.Broadcast(length, 0, what + " (size)");
        var data = IsRoot ? bytes : new byte[BinaryPrimitives.ReadInt64LittleEndian(length)];
        Collectives.Broadcast(data, 0, what);
        return Encoding.UTF8.GetString(data);
    }

    /// <summary>
    /// The end of the job on this rank, reached by every rank together: after it MPI is finalised at exit. A rank that
    /// is disposed without finishing (an error) leaves MPI without finalising, so the launcher stops the other ranks.
    /// </summary>
    public void Finish()
    {
        if (Enabled) Collectives.Barrier("the end of the run");
        _nccl?.Dispose();
        _nccl = null;
        _finished = true;
        if (Collectives is MpiCollectives mpi) mpi.Finish();
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _nccl?.Dispose();
        _nccl = null;
        if (!_finished && Collectives is MpiCollectives mpi) mpi.Abandon();
    }

    static char Kind(Exception e) => e switch
    {
        InvalidDataException => 'd',
        IOException => 'i',
        FormatException => 'f',
        UnauthorizedAccessException => 'u',
        _ => 'o',
    };

    static Exception Rebuild(char kind, string message) => kind switch
    {
        'd' => new InvalidDataException(message),
        'i' => new IOException(message),
        'f' => new FormatException(message),
        'u' => new UnauthorizedAccessException(message),
        _ => new InvalidOperationException(message),
    };
}
