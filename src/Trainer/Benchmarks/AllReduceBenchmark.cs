using System.Diagnostics;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// <c>qlora bench nccl</c>: the NCCL all-reduce that data-parallel CUDA ranks sum their LoRA gradients with, on a
/// buffer the size of a step's gradients, through the same <see cref="NcclCommunicator"/> training uses. Every rank
/// fills the buffer with a pattern of small integers times (rank + 1), so the sum over N ranks is the pattern times
/// N(N + 1)/2 exactly in float32 and is checked element by element. One process is a 1-rank communicator (what a
/// machine with one GPU can test); under an MPI launcher the ranks are MPI's.
/// </summary>
public static class AllReduceBenchmark
{
    /// <summary>What to measure.</summary>
    public sealed record Options
    {
        /// <summary>The CUDA device (each rank's own under MPI).</summary>
        public required ComputeDevice Device { get; init; }
        /// <summary>Buffer size in MiB (160 MiB ≈ the float32 gradients of r = 16 on all projections of Llama-2-7B).</summary>
        public int Mebibytes { get; init; } = 160;
        /// <summary>Timed all-reduces (median reported), after two untimed ones.</summary>
        public int Runs { get; init; } = 20;
    }

    /// <summary>The figures.</summary>
    public sealed record Result(int Ranks, long Bytes, double MedianSeconds, bool Exact, long Mismatches, string Nccl, string Source)
    {
        /// <summary>Bytes summed per second (NCCL's "algorithm bandwidth").</summary>
        public double AlgorithmGBps => Bytes / MedianSeconds / 1e9;
        /// <summary>The bandwidth each rank's links carry in a ring all-reduce: algbw · 2(N − 1)/N (0 for one rank).</summary>
        public double BusGBps => AlgorithmGBps * 2.0 * (Ranks - 1) / Ranks;

        /// <summary>One JSON line.</summary>
        public string ToJson(string device) => System.Text.Json.JsonSerializer.Serialize(new
        {
            bench = "nccl", device, ranks = Ranks, bytes = Bytes, allreduce_s = Math.Round(MedianSeconds, 6),
            algbw_gbps = Math.Round(AlgorithmGBps, 2), busbw_gbps = Math.Round(BusGBps, 2), exact = Exact, mismatches = Mismatches,
            nccl = Nccl, nccl_library = Source,
        });
    }

    /// <summary>Runs it on <paramref name="ranks"/> (every rank calls this); throws with what is missing when NCCL cannot be used.</summary>
    public static Result Run(Options o, DataParallel ranks, Action<string>? log = null)
    {
        if (!o.Device.IsCuda)
            throw new ArgumentException($"NCCL sums buffers on CUDA devices and this run is on {o.Device.Name}; run it with --device cuda on a " +
                "machine with an NVIDIA GPU (CPU ranks sum over MPI: bench train under mpirun measures that)");
        if (o.Mebibytes <= 0 || o.Runs <= 0) throw new ArgumentException("--mib and --runs must be positive");
        var reasons = new List<string>();
        using var nccl = NcclCommunicator.Join(ranks, o.Device.Ordinal, line => { reasons.Add(line); log?.Invoke(line); })
            ?? throw new InvalidOperationException($"NCCL cannot be used: {string.Join("; ", reasons)}");
        long count = (long)o.Mebibytes * 1024 * 1024 / sizeof(float);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var pattern = arange(count, ScalarType.Int64, o.Device.Torch).remainder_(251).to(ScalarType.Float32);
        var buffer = empty(count, ScalarType.Float32, o.Device.Torch);
        float mine = ranks.Rank + 1, total = ranks.WorldSize * (ranks.WorldSize + 1) / 2f;
        var times = new List<double>();
        long mismatches = 0;
        for (int run = -2; run < o.Runs; run++)
        {
            buffer.copy_(pattern).mul_(mine);
            o.Device.Synchronize();
            var clock = Stopwatch.StartNew();
            nccl.AllReduceSum(buffer, $"benchmark all-reduce {run + 3}");
            clock.Stop();
            if (run >= 0) times.Add(clock.Elapsed.TotalSeconds);
            if (run == -2)
            {
                using var expected = pattern * total;
                mismatches = buffer.ne(expected).sum().item<long>();
            }
        }
        Span<double> worst = [mismatches];
        ranks.Sum(worst, "the benchmark's mismatch counts");
        return new Result(ranks.WorldSize, count * sizeof(float), BenchStatistics.Median(times), worst[0] == 0, (long)worst[0], nccl.Description,
            nccl.Source);
    }
}
