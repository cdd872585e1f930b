using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Measures the memory of real QLoRA steps on a model of true shape with random NF4 weights (<see cref="RandomFourBitModel"/>):
/// LoRA on every linear layer, gradient checkpointing, paged AdamW, bf16 compute. The peak resident anonymous memory
/// (on the CPU backend: device memory) is sampled throughout, from a baseline taken before anything is loaded. Without
/// streaming the 4-bit weights are in memory; with it they are written once as a bnb-4bit checkpoint and streamed from
/// the memory-mapped files layer by layer (<see cref="LayerStreamer"/>).
/// </summary>
public static class MemoryBenchmark
{
    /// <summary>What to measure.</summary>
    public sealed record Options
    {
        /// <summary>Preset name (see <see cref="ModelPresets"/>), for the report.</summary>
        public required string Preset { get; init; }
        /// <summary>The architecture (the preset's, possibly with overrides).</summary>
        public required LlamaConfig Config { get; init; }
        /// <summary>Tokens per sequence (one sequence per step).</summary>
        public int Sequence { get; init; } = 512;
        /// <summary>LoRA rank on every linear layer (alpha = 2·rank).</summary>
        public int Rank { get; init; } = 16;
        /// <summary>Training steps.</summary>
        public int Steps { get; init; } = 1;
        /// <summary>Stream the decoder layers from a checkpoint on disk.</summary>
        public bool Stream { get; init; }
        /// <summary>Most decoder layers resident at once when streaming.</summary>
        public int StreamWindow { get; init; } = 2;
        /// <summary>Tokens per chunk of the fp32 loss's logits (<see cref="LlamaForCausalLM.LossChunkTokens"/>; null: the model's default).</summary>
        public int? LossChunkTokens { get; init; }
        /// <summary>Offloaded checkpoints (<see cref="LlamaForCausalLM.OffloadCheckpoints"/>).</summary>
        public bool OffloadCheckpoints { get; init; } = true;
        /// <summary>MLP tiles, norm tiles and attention by K/V group (all off by default).</summary>
        public LongContextSwitches LongContext { get; init; } = new();
        /// <summary>Folder of the streamed checkpoint (written if it does not hold these weights yet).</summary>
        public string ScratchFolder { get; init; } = Path.Combine("scratch", "bench-memory");
        /// <summary>The device the model and the step live on (the sampler should read this device's memory).</summary>
        public ComputeDevice Device { get; init; } = ComputeDevice.Cpu;
    }

    /// <summary>The figures of one run.</summary>
    public sealed record Result(
        long BaselineBytes, long PeakBytes, long PreparePeakBytes, IReadOnlyList<double> StepSeconds, IReadOnlyList<float> Losses,
        long FourBitBytes, long DenseBytes, long LoraParams, long OptimizerHostBytes, long OptimizerDeviceBytes,
        double LoadSeconds, double PrepareSeconds, string? CheckpointFolder, long CheckpointBytes,
        int StreamLoads, int StreamSyncLoads, int StreamMaxResident, long StreamLayerBytes, double StreamWaitSeconds)
    {
        /// <summary>The step time reported: the median of the steps after the first when there are any, else the first.</summary>
        public double ReportedStepSeconds => StepSeconds.Count == 1 ? StepSeconds[0] : BenchStatistics.Median(StepSeconds.Skip(1).ToList());
    }

    /// <summary>Runs the measurement, reporting progress to <paramref name="log"/>; the sampler's baseline is taken first thing.</summary>
    public static Result Run(Options o, Action<string>? log = null, PeakMemorySampler? sampler = null)
    {
        if (o.Sequence < 2) throw new ArgumentException($"--seq {o.Sequence}: a step needs at least 2 tokens");
        if (o.Rank <= 0) throw new ArgumentException($"--rank {o.Rank}: must be positive");
        if (o.Steps <= 0) throw new ArgumentException($"--steps {o.Steps}: must be positive");
        if (o.StreamWindow <= 0) throw new ArgumentException($"--window {o.StreamWindow}: must be positive");
        if (o.LossChunkTokens <= 0) throw new ArgumentException($"--loss-chunk {o.LossChunkTokens}: must be positive");
        o.Config.Validate();
        bool ownSampler = sampler is null;
        sampler ??= o.Device.CreateMemorySampler();
        try
        {
            var random = new RandomFourBitModel(o.Config);
            var config = o.Config;
            string? folder = null;
            long checkpointBytes = 0;
            var prepare = Stopwatch.StartNew();
            long preparePeak = 0;
            if (o.Stream)
            {
                folder = Path.Combine(o.ScratchFolder, FolderName(o));
                random.WriteFolder(folder, log);
                checkpointBytes = Directory.EnumerateFiles(folder, "*.safetensors").Sum(f => new FileInfo(f).Length);
                // The checkpoint is a one-off preparation (qlora quantize's job in real use): measure from here on.
                ManagedHeap.ReturnFreeMemory();
                preparePeak = sampler.PeakBytes;
                sampler.Reset();
            }
            double prepareSeconds = prepare.Elapsed.TotalSeconds;

            var load = Stopwatch.StartNew();
            using var model = o.Stream
                ? HfModelLoader.Load(folder!, new HfModelLoader.Options { Streaming = true, StreamWindow = o.StreamWindow, Device = o.Device.Torch }, log)
                : LlamaForCausalLM.FromWeights(config, random, projections: random, device: o.Device.Torch);
            // Building the model leaves managed garbage (absmax arrays, quant states, JSON): return it before measuring the step.
            ManagedHeap.ReturnFreeMemory();
            long fourBit = model.named_modules().Select(m => m.module).OfType<Linear4bit>().Distinct().Sum(l => l.QuantizedBytes);
            long dense = model.named_parameters().Sum(p => p.parameter.numel() * p.parameter.element_size());
            model.ApplyLora(new LoraOptions { Rank = o.Rank, Alpha = 2 * o.Rank }, new Generator(1));
            model.GradientCheckpointing = true;
            model.OffloadCheckpoints = o.OffloadCheckpoints;
            o.LongContext.Apply(model);
            if (o.LossChunkTokens is int chunk) model.LossChunkTokens = chunk;
            model.train();
            long lora = model.TrainableParameters().Sum(p => p.Parameter.numel());
            using var optimizer = new BnbAdamW(model.ParameterGroups(2e-4), new AdamWOptions { Paged = true });
            double loadSeconds = load.Elapsed.TotalSeconds;
            log?.Invoke($"loaded in {loadSeconds:F1} s: {fourBit / 1e9:F2} GB of 4-bit projections{(o.Stream ? " (streamed)" : "")}, {dense / 1e9:F2} GB dense bf16, " +
                $"LoRA r={o.Rank}: {lora / 1e6:F1} M parameters; resident anonymous memory {Gb(sampler.Sample())}");

            var gen = new Generator(7);
            var times = new List<double>();
            var losses = new List<float>();
            for (int step = 0; step < o.Steps; step++)
            {
                using var scope = NewDisposeScope();
                var ids = randint(0, config.VocabSize, [1, o.Sequence], generator: gen).to(o.Device.Torch);
                var sw = Stopwatch.StartNew();
                var (sum, n) = model.Loss(ids, ids);
                var loss = sum / n;
                Checkpoint.Backward(loss);
                optimizer.Step();
                optimizer.ZeroGrad();
                o.Device.Synchronize();
                times.Add(sw.Elapsed.TotalSeconds);
                float value = loss.item<float>();
                losses.Add(value);
                if (!float.IsFinite(value)) throw new InvalidOperationException($"step {step}: the loss is {value}: the random weights overflowed");
                log?.Invoke($"step {step}: {times[^1]:F1} s, loss {value:F3}, resident anonymous memory now {Gb(sampler.Sample())}, peak {Gb(sampler.PeakBytes)}");
            }
            var s = model.Streamer;
            return new Result(sampler.Baseline, sampler.PeakBytes, preparePeak, times, losses, fourBit, dense, lora, optimizer.HostStateBytes,
                optimizer.DeviceStateBytes, loadSeconds, prepareSeconds, folder, checkpointBytes,
                s?.Loads ?? 0, s?.SynchronousLoads ?? 0, s?.MaxResidentLayers ?? 0, s?.LargestLayerBytes ?? 0, s?.WaitSeconds ?? 0);
        }
        finally
        {
            if (ownSampler) sampler.Dispose();
        }
    }

    /// <summary>The scratch sub-folder of a shape: the preset name, plus the shape when it was overridden.</summary>
    private static string FolderName(Options o)
    {
        var c = o.Config;
        return $"{o.Preset}-L{c.NumHiddenLayers}-h{c.HiddenSize}-i{c.IntermediateSize}-a{c.NumAttentionHeads}-kv{c.NumKeyValueHeads}-v{c.VocabSize}";
    }

    private static string Gb(long bytes) => $"{bytes / 1e9:F2} GB";
}
