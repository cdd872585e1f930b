using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Measures a QLoRA training step (forward, backward, optimizer) on a Llama-shaped model with random NF4 weights, and in
/// the same run the same step with dense bf16 frozen weights and the machine's bf16 matmul rate, so the figures are
/// ratios on one machine: model FLOPs utilisation and the cost of dequantizing on the fly.
/// </summary>
public static class TrainBenchmark
{
    /// <summary>What to measure.</summary>
    public sealed record Options
    {
        /// <summary>Decoder layers.</summary>
        public int Layers { get; init; } = 12;
        /// <summary>hidden_size.</summary>
        public int Hidden { get; init; } = 1024;
        /// <summary>intermediate_size.</summary>
        public int Intermediate { get; init; } = 2816;
        /// <summary>Attention heads (head_dim = hidden / heads).</summary>
        public int Heads { get; init; } = 16;
        /// <summary>Key/value heads.</summary>
        public int KvHeads { get; init; } = 4;
        /// <summary>vocab_size.</summary>
        public int Vocab { get; init; } = 32000;
        /// <summary>Tokens per sequence.</summary>
        public int Sequence { get; init; } = 512;
        /// <summary>Sequences per step.</summary>
        public int Batch { get; init; } = 1;
        /// <summary>LoRA rank on every linear layer of the decoder.</summary>
        public int Rank { get; init; } = 16;
        /// <summary>Timed steps per variant (after one warm-up step); medians are reported.</summary>
        public int Steps { get; init; } = 3;
        /// <summary>Recompute each decoder layer in backward (the QLoRA default).</summary>
        public bool Checkpointing { get; init; } = true;
        /// <summary>Side of the square bf16 matmul that measures the machine's peak rate.</summary>
        public int MatmulSize { get; init; } = 2048;
        /// <summary>The device both variants and the matmul run on.</summary>
        public ComputeDevice Device { get; init; } = ComputeDevice.Cpu;
    }

    /// <summary>The figures of one run.</summary>
    public sealed record Result(
        long Params, long LinearParams, long LoraParams, int Tokens,
        double QloraStepSeconds, double DenseStepSeconds, double MatmulGflops,
        double ModelFlopsPerStep, int Threads)
    {
        /// <summary>Tokens per second of the QLoRA step.</summary>
        public double TokensPerSecond => Tokens / QloraStepSeconds;
        /// <summary>QLoRA steps per second.</summary>
        public double StepsPerSecond => 1 / QloraStepSeconds;
        /// <summary>Model FLOPs per second over the measured bf16 matmul rate.</summary>
        public double Mfu => ModelFlopsPerStep / QloraStepSeconds / (MatmulGflops * 1e9);
        /// <summary>QLoRA step time over the dense-bf16 step time: the cost of dequantizing on the fly.</summary>
        public double DequantOverhead => QloraStepSeconds / DenseStepSeconds;

        // Four significant digits, so that a tiny model's small figures never round to zero.
        static double Sig(double x) => x == 0 || !double.IsFinite(x) ? x
            : Math.Round(x, Math.Clamp(3 - (int)Math.Floor(Math.Log10(Math.Abs(x))), 0, 15));

        /// <summary>One JSON line of the figures, naming the device they were measured on.</summary>
        public string ToJson(string device = "cpu") => System.Text.Json.JsonSerializer.Serialize(new
        {
            bench = "train", device, @params = Params, linear_params = LinearParams, lora_params = LoraParams, tokens_per_step = Tokens,
            step_s = Sig(QloraStepSeconds), dense_step_s = Sig(DenseStepSeconds),
            steps_per_s = Sig(StepsPerSecond), tokens_per_s = Sig(TokensPerSecond),
            matmul_gflops = Sig(MatmulGflops), model_gflops_per_step = Sig(ModelFlopsPerStep / 1e9),
            mfu = Sig(Mfu), dequant_overhead = Sig(DequantOverhead), threads = Threads,
        });
    }

    /// <summary>Runs the benchmark, reporting progress lines to <paramref name="log"/>.</summary>
    public static Result Run(Options o, Action<string>? log = null)
    {
        if (o.Hidden % o.Heads != 0 || o.Heads % o.KvHeads != 0) throw new ArgumentException("hidden must be a multiple of heads, heads of kv heads");
        var config = ConfigOf(o);
        double gflops = MatmulRate(o.MatmulSize, o.Device);
        log?.Invoke($"bf16 matmul {o.MatmulSize}^3: {gflops:F1} GFLOP/s on {(o.Device.IsCuda ? o.Device.Description : $"{torch.get_num_threads()} threads")}");

        // Both variants live side by side and their steps alternate, so machine noise hits them alike.
        using var q = Variant.Create(config, o, quantize: true);
        using var d = Variant.Create(config, o, quantize: false);
        var gen = new Generator(5);
        var qTimes = new List<double>();
        var dTimes = new List<double>();
        for (int i = 0; i <= o.Steps; i++)
        {
            using var scope = NewDisposeScope();
            var ids = randint(0, config.VocabSize, [o.Batch, o.Sequence], generator: gen).to(o.Device.Torch);
            double tq = q.Step(ids), td = d.Step(ids);
            if (i > 0) { qTimes.Add(tq); dTimes.Add(td); } // step 0 warms up
            log?.Invoke($"step {i}{(i == 0 ? " (warm-up)" : "")}: qlora {tq:F2} s, dense bf16 {td:F2} s");
        }
        double qlora = BenchStatistics.Median(qTimes), dense = BenchStatistics.Median(dTimes);
        var stats = q.Stats;

        int tokens = o.Batch * o.Sequence;
        // Model FLOPs: forward 2·N and input-gradient 2·N per token for every linear layer (frozen weights get no
        // weight gradient; LoRA adds a negligible 6·r·(in+out)); attention's QKᵀ and PV: 4·B·T²·H forward, twice that
        // in backward, per layer, counted without the causal half. The checkpoint recompute is not counted.
        double linearFlops = 4.0 * stats.LinearParams * tokens;
        double attentionFlops = 12.0 * o.Layers * o.Batch * (double)o.Sequence * o.Sequence * o.Hidden;
        return new Result(stats.Params, stats.LinearParams, stats.LoraParams, tokens, qlora, dense, gflops,
            linearFlops + attentionFlops, torch.get_num_threads());
    }

    /// <summary>The figures of a data-parallel run (<see cref="RunDataParallel"/>).</summary>
    public sealed record DataParallelResult(int Ranks, int ThreadsPerRank, int GlobalBatch, int Tokens, long LoraParams,
        double OneProcessStepSeconds, double StepSeconds, double AllReduceSeconds, double WaitSeconds)
    {
        /// <summary>One process's step time over the ranks' step time.</summary>
        public double Speedup => OneProcessStepSeconds / StepSeconds;
        /// <summary>Speedup per rank: 1 is perfect scaling.</summary>
        public double ScalingEfficiency => Speedup / Ranks;
        /// <summary>The share of a data-parallel step spent in the gradient all-reduce itself (after every rank arrived).</summary>
        public double AllReduceShare => AllReduceSeconds / StepSeconds;
        /// <summary>The share of a data-parallel step spent waiting for the slowest rank before the all-reduce.</summary>
        public double WaitShare => WaitSeconds / StepSeconds;

        static double Sig(double x) => Math.Round(x, 4);

        /// <summary>One JSON line of the figures.</summary>
        public string ToJson() => System.Text.Json.JsonSerializer.Serialize(new
        {
            bench = "train_data_parallel", ranks = Ranks, threads_per_rank = ThreadsPerRank, global_batch = GlobalBatch, tokens_per_step = Tokens,
            lora_params = LoraParams, allreduce_bytes = 4 * LoraParams, one_process_step_s = Sig(OneProcessStepSeconds), step_s = Sig(StepSeconds),
            allreduce_s = Sig(AllReduceSeconds), allreduce_share = Sig(AllReduceShare), wait_s = Sig(WaitSeconds), wait_share = Sig(WaitShare), speedup = Sig(Speedup), scaling_efficiency = Sig(ScalingEfficiency),
        });
    }

    /// <summary>
    /// Data-parallel scaling on the ranks of <paramref name="ranks"/>: the same global batch of <see cref="Options.Batch"/>
    /// sequences per step, trained (a) split across the ranks with the LoRA gradients all-reduced, and (b) whole by rank 0
    /// alone with the same threads as one rank, while the others wait. The two alternate step by step so machine noise
    /// hits both alike; medians are reported. Each rank builds the same random NF4 model; the dense variant is skipped.
    /// A barrier before the all-reduce (in the benchmark only) separates waiting for the slowest rank from the exchange.
    /// </summary>
    public static DataParallelResult RunDataParallel(Options o, DataParallel ranks, Action<string>? log = null)
    {
        if (o.Batch < ranks.WorldSize) throw new ArgumentException($"--batch {o.Batch}: the global batch needs at least one sequence per rank ({ranks.WorldSize} ranks)");
        var config = ConfigOf(o);
        using var parallel = Variant.Create(config, o, quantize: true);
        using var single = ranks.IsRoot ? Variant.Create(config, o, quantize: true) : null;
        var (start, count) = BatchSharding.Range(o.Batch, ranks.Rank, ranks.WorldSize);
        var gen = new Generator(5);
        var steps = new List<double>();
        var reduces = new List<double>();
        var waits = new List<double>();
        var singles = new List<double>();
        for (int i = 0; i <= o.Steps; i++)
        {
            using var scope = NewDisposeScope();
            var ids = randint(0, config.VocabSize, [o.Batch, o.Sequence], generator: gen).to(o.Device.Torch); // the same global batch on every rank
            ranks.Collectives.Barrier($"the start of benchmark step {i}");
            var (step, wait, reduce) = parallel.StepDataParallel(ids.narrow(0, start, count), (long)o.Batch * (o.Sequence - 1), ranks, i);
            double one = single?.Step(ids) ?? 0;
            ranks.Collectives.Barrier($"the end of benchmark step {i}");
            if (i > 0) { steps.Add(step); waits.Add(wait); reduces.Add(reduce); singles.Add(one); }
            log?.Invoke($"step {i}{(i == 0 ? " (warm-up)" : "")}: {ranks.WorldSize} ranks {step:F3} s (waiting {wait:F3} s, all-reduce {reduce:F3} s), one process {one:F3} s");
        }
        // Rank 0's figures are the ones reported: its step includes waiting for the slowest rank at the all-reduce.
        return new DataParallelResult(ranks.WorldSize, torch.get_num_threads(), o.Batch, o.Batch * o.Sequence, parallel.Stats.LoraParams,
            BenchStatistics.Median(singles), BenchStatistics.Median(steps), BenchStatistics.Median(reduces), BenchStatistics.Median(waits));
    }

    static LlamaConfig ConfigOf(Options o) => new()
    {
        HiddenSize = o.Hidden, IntermediateSize = o.Intermediate, NumHiddenLayers = o.Layers, NumAttentionHeads = o.Heads,
        NumKeyValueHeads = o.KvHeads, VocabSize = o.Vocab, HeadDim = o.Hidden / o.Heads, RmsNormEps = 1e-5, RopeTheta = 10000,
        MaxPositionEmbeddings = Math.Max(2048, o.Sequence),
    };

    private sealed record ModelStats(long Params, long LinearParams, long LoraParams);

    /// <summary>One model (4-bit or dense frozen weights) with LoRA r on every projection and a paged AdamW.</summary>
    private sealed class Variant : IDisposable
    {
        private readonly LlamaForCausalLM _model;
        private readonly BnbAdamW _optimizer;

        private readonly ComputeDevice _device;

        private Variant(LlamaForCausalLM model, BnbAdamW optimizer, ModelStats stats, ComputeDevice device)
        {
            _device = device;
            _model = model;
            _optimizer = optimizer;
            Stats = stats;
        }

        public ModelStats Stats { get; }

        public static Variant Create(LlamaConfig config, Options o, bool quantize)
        {
            var model = LlamaForCausalLM.CreateRandom(config, 1234, quantize, device: o.Device.Torch);
            model.ApplyLora(new LoraOptions { Rank = o.Rank, Alpha = 2 * o.Rank }, new Generator(1));
            model.GradientCheckpointing = o.Checkpointing;
            model.train();
            var optimizer = new BnbAdamW(model.ParameterGroups(2e-4), new AdamWOptions { Paged = true });
            long linear = 0;
            foreach (var layer in model.model.layers)
            {
                foreach (var p in new[] { "q_proj", "k_proj", "v_proj", "o_proj" }) linear += Elements(layer.self_attn.Projection(p));
                foreach (var p in new[] { "gate_proj", "up_proj", "down_proj" }) linear += Elements(layer.mlp.Projection(p));
            }
            linear += (long)config.VocabSize * config.HiddenSize; // lm_head
            long lora = model.TrainableParameters().Sum(p => p.Parameter.numel());
            long embed = (long)config.VocabSize * config.HiddenSize;
            return new Variant(model, optimizer, new ModelStats(linear + embed, linear, lora), o.Device);
        }

        /// <summary>Seconds for one forward + backward + optimizer step.</summary>
        public double Step(Tensor ids)
        {
            using var scope = NewDisposeScope();
            var sw = Stopwatch.StartNew();
            var (sum, n) = _model.Loss(ids, ids);
            Checkpoint.Backward(sum / n);
            _optimizer.Step();
            _optimizer.ZeroGrad();
            _device.Synchronize(); // a GPU step is done when its queued work is
            return sw.Elapsed.TotalSeconds;
        }

        /// <summary>
        /// One data-parallel step on this rank's <paramref name="ids"/>: the loss normalised by the global batch's
        /// <paramref name="globalTargets"/>, the gradients all-reduced, the optimizer step. Returns the step's seconds,
        /// the seconds spent waiting for the other ranks before the all-reduce, and the all-reduce's.
        /// </summary>
        public (double Step, double Wait, double Reduce) StepDataParallel(Tensor ids, long globalTargets, DataParallel ranks, int step)
        {
            using var scope = NewDisposeScope();
            var sw = Stopwatch.StartNew();
            var (sum, _) = _model.Loss(ids, ids);
            Checkpoint.Backward(sum / globalTargets);
            double arrived = sw.Elapsed.TotalSeconds;
            ranks.Collectives.Barrier($"the backward of benchmark step {step}");
            double wait = sw.Elapsed.TotalSeconds - arrived;
            var before = ranks.ReduceTime;
            ranks.ReduceGradients([.. _optimizer.Parameters.Select(p => p.Parameter)], 0, false, step);
            double reduce = (ranks.ReduceTime - before).TotalSeconds;
            _optimizer.Step();
            _optimizer.ZeroGrad();
            return (sw.Elapsed.TotalSeconds, wait, reduce);
        }

        public void Dispose()
        {
            _optimizer.Dispose();
            _model.Dispose();
        }
    }

    private static long Elements(nn.Module<Tensor, Tensor> m) => m switch
    {
        LoraLinear l => l.InFeatures * l.OutFeatures,
        Linear4bit q => q.InFeatures * q.OutFeatures,
        TorchSharp.Modules.Linear d => d.in_features * d.out_features,
        _ => throw new InvalidOperationException($"unexpected projection {m.GetType().Name}"),
    };

    /// <summary>The bf16 matmul rate (GFLOP/s, median of several n³ products) on <paramref name="device"/> (default: the CPU).</summary>
    public static double MatmulRate(int n, ComputeDevice? device = null)
    {
        device ??= ComputeDevice.Cpu;
        using var scope = NewDisposeScope();
        var a = randn(n, n).to(ScalarType.BFloat16).to(device.Torch);
        var b = randn(n, n).to(ScalarType.BFloat16).to(device.Torch);
        matmul(a, b).Dispose();
        device.Synchronize();
        var times = new List<double>();
        for (int i = 0; i < 5; i++)
        {
            var sw = Stopwatch.StartNew();
            matmul(a, b).Dispose();
            device.Synchronize();
            times.Add(sw.Elapsed.TotalSeconds);
        }
        return 2.0 * n * n * (double)n / BenchStatistics.Median(times) / 1e9;
    }
}
