using System.Globalization;
using QLora.Kernels;
using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Predicts the memory of a QLoRA training job before anything is loaded: the persistent parts counted exactly as this
/// project stores them (4-bit weights with their absmax and nested double-quant parts, bf16 embeddings/lm_head/norms,
/// LoRA master weights and gradients, optimizer state as <see cref="BnbAdamW"/> lays it out), and the step's transient
/// memory by replaying the tensors the modules create, in order (see <see cref="StepMemorySimulation"/>). The peak is
/// the largest total of that replay; a job over budget gets re-planned variants that fit.
/// </summary>
public static class MemoryPlanner
{
    private static readonly string[] AttentionProjections = ["q_proj", "k_proj", "v_proj", "o_proj"];
    private static readonly string[] MlpProjections = ["gate_proj", "up_proj", "down_proj"];

    /// <summary>Plans <paramref name="config"/> with <paramref name="options"/>; over budget, adds suggestions that fit.</summary>
    public static MemoryPlan Plan(LlamaConfig config, PlanOptions options)
    {
        var plan = PlanOnce(config, options);
        return plan.Fits ? plan : plan with { Suggestions = Suggest(config, options) };
    }

    /// <summary>
    /// The longest sequence, a multiple of <paramref name="step"/>, whose plan with <paramref name="options"/> fits
    /// its budget (0 when not even <paramref name="step"/> tokens fit). The peak grows with the sequence, so a doubling
    /// search then a bisection finds it in a few dozen plans.
    /// </summary>
    public static int MaxSequenceLength(LlamaConfig config, PlanOptions options, int step = 1024)
    {
        long budget = options.BudgetBytes ?? throw new ArgumentException("the longest sequence that fits needs a budget");
        if (step < 2) throw new ArgumentOutOfRangeException(nameof(step), "the step must be at least 2 tokens");
        bool Fits(long units) => PlanOnce(config, options with { SequenceLength = checked((int)(units * step)) }).PeakBytes <= budget;
        if (!Fits(1)) return 0;
        long lo = 1, hi = 2;
        long maxUnits = int.MaxValue / step;
        while (hi <= maxUnits && Fits(hi)) { lo = hi; hi *= 2; }
        hi = Math.Min(hi, maxUnits + 1);
        while (hi - lo > 1)
        {
            long mid = (lo + hi) / 2;
            if (Fits(mid)) lo = mid; else hi = mid;
        }
        return (int)(lo * step);
    }

    /// <summary>
    /// Bytes of one 4-bit weight of <paramref name="elements"/> elements as <see cref="Linear4bit"/> holds it: packed
    /// codes (two per byte), then per block of <paramref name="blocksize"/> either a float32 absmax or, double-quantized,
    /// a uint8 code plus a float32 absmax per 256 codes and the 256-entry float32 code map.
    /// </summary>
    public static long QuantizedWeightBytes(long elements, int blocksize, bool doubleQuant)
    {
        long packed = (elements + 1) / 2;
        long blocks = (elements + blocksize - 1) / blocksize;
        if (!doubleQuant) return packed + 4 * blocks;
        long nested = (blocks + DoubleQuantizer.NestedBlocksize - 1) / DoubleQuantizer.NestedBlocksize;
        return packed + blocks + 4 * nested + 4 * 256;
    }

    /// <summary>The (out, in) shape of each projection of a decoder layer, by HF name.</summary>
    public static IReadOnlyList<(string Name, long Out, long In)> ProjectionShapes(LlamaConfig c)
    {
        long q = (long)c.NumAttentionHeads * c.HeadDim, kv = (long)c.NumKeyValueHeads * c.HeadDim;
        return
        [
            ("q_proj", q, c.HiddenSize), ("k_proj", kv, c.HiddenSize), ("v_proj", kv, c.HiddenSize), ("o_proj", c.HiddenSize, q),
            ("gate_proj", c.IntermediateSize, c.HiddenSize), ("up_proj", c.IntermediateSize, c.HiddenSize), ("down_proj", c.HiddenSize, c.IntermediateSize),
        ];
    }

    /// <summary>
    /// DoRA's extra work per micro-batch: one weight norm per adapted projection and forward (two forwards with gradient
    /// checkpointing: the recompute computes it again, as PEFT's does), each dequantizing the [out, in] weight and
    /// forming W + scaling·B·A in float32 (Elements in all, and 2·r·out·in flops each for B·A).
    /// Zero without DoRA.
    /// </summary>
    public static (int Norms, long Elements, double Flops) DoraWeightNormCost(LlamaConfig config, PlanOptions options)
    {
        if (!options.UseDora) return (0, 0, 0);
        int passes = options.GradientCheckpointing ? 2 : 1;
        var adapted = ProjectionShapes(config).Where(s => options.LoraTargets.Contains(s.Name)).ToList();
        long elements = adapted.Sum(s => s.Out * s.In) * config.NumHiddenLayers * passes;
        return (adapted.Count * config.NumHiddenLayers * passes, elements, 2.0 * options.LoraRank * elements);
    }

    /// <summary>Bytes of the optimizer state of one parameter of <paramref name="elements"/> elements, as <see cref="BnbAdamW"/> lays it out.</summary>
    public static long OptimizerStateBytes(long elements, int bits, int minEightBitSize = 4096)
    {
        if (bits == 32 || elements < minEightBitSize) return 8 * elements;
        long blocks = (elements + AdamW8bitStep.Blocksize - 1) / AdamW8bitStep.Blocksize;
        return Align(2 * elements) + 8 * blocks;
    }

    private static long Align(long bytes) => (bytes + 63) & ~63L;

    private static MemoryPlan PlanOnce(LlamaConfig cfg, PlanOptions o)
    {
        cfg.Validate();
        o.Validate();
        int c = StepMemorySimulation.DTypeBytes(o.ComputeDType);
        int m = StepMemorySimulation.DTypeBytes(o.AdapterDType);
        int layers = cfg.NumHiddenLayers;
        var shapes = ProjectionShapes(cfg);

        long layerQuant = shapes.Sum(s => o.QuantizeBase ? QuantizedWeightBytes(s.Out * s.In, o.QuantBlocksize, o.DoubleQuant) : s.Out * s.In * c);
        long quantAll = layerQuant * layers;

        long h = cfg.HiddenSize, v = cfg.VocabSize;
        long q = (long)cfg.NumAttentionHeads * cfg.HeadDim, kv = (long)cfg.NumKeyValueHeads * cfg.HeadDim;
        long biasPerLayer = (cfg.AttentionBias ? q + 2 * kv + (cfg.QkvBiasOnly ? 0 : h) : 0) + (cfg.MlpBias ? 2L * cfg.IntermediateSize + h : 0);
        bool hostEmbedding = o.HostEmbedding && !cfg.TieWordEmbeddings;
        long embed = hostEmbedding ? 0 : v * h * c;
        long head = cfg.TieWordEmbeddings ? 0 : v * h * c;
        // Two norms per layer (Gemma: four, around attention and MLP), the final one; Qwen3 and Gemma 3 add q_norm, k_norm.
        long norms = ((cfg.Gemma is null ? 2L : 4L) * layers + 1) * h * c + (cfg.QkNorm ? 2L * layers * cfg.HeadDim * c : 0);
        long unquant = embed + head + norms + biasPerLayer * c * layers;

        // LoRA: A [r, in] and B [out, r] per target projection; DoRA adds the magnitude [out].
        var loraTensors = new List<long>();
        foreach (var (name, outF, inF) in shapes)
            if (o.LoraTargets.Contains(name))
            {
                loraTensors.Add(o.LoraRank * inF);
                loraTensors.Add(outF * o.LoraRank);
                if (o.UseDora) loraTensors.Add(outF);
            }
        if (loraTensors.Count == 0) throw new ArgumentException("the LoRA targets select no projection");
        long loraParams = loraTensors.Sum() * layers;
        long loraBytes = loraParams * m;
        long optTotal = loraTensors.Sum(n => Align(OptimizerStateBytes(n, o.OptimizerBits))) * layers;
        long optLargest = loraTensors.Max(n => OptimizerStateBytes(n, o.OptimizerBits));
        long optDevice = o.PagedOptimizer ? optLargest : optTotal;
        // After backward, one tensor at a time: the gradient norm squares a float64 copy of each gradient
        // (TrainingRun.GradNorm), and bf16 master weights are updated through float32 copies of parameter and gradient
        // (BnbAdamW); either is 8 bytes per element of the largest LoRA tensor.
        long optUpdate = 8 * loraTensors.Max();

        var persistent = new List<(string, long)>
        {
            (StepMemorySimulation.QuantizedWeights, o.LayerStreaming ? 0 : quantAll),
            (StepMemorySimulation.StreamingWindow, o.LayerStreaming ? layerQuant * Math.Min(o.StreamingWindow, layers) : 0),
            (StepMemorySimulation.UnquantizedWeights, unquant),
            (StepMemorySimulation.LoraWeights, loraBytes),
            (StepMemorySimulation.LoraGradients, loraBytes),
            (StepMemorySimulation.OptimizerState, optDevice),
            (StepMemorySimulation.FrameworkOverhead, o.RuntimeOverheadBytes),
        };
        var sim = StepMemorySimulation.Run(cfg, o, persistent, optUpdate);

        string Bits(long bytes, long n) => (8.0 * bytes / n).ToString("F3", CultureInfo.InvariantCulture);
        long linearParams = shapes.Sum(s => s.Out * s.In) * layers;
        var descriptions = new Dictionary<string, string>
        {
            [StepMemorySimulation.QuantizedWeights] = o.LayerStreaming ? "4-bit decoder weights: streamed, none resident"
                : !o.QuantizeBase ? $"16-bit decoder weights (no quantization): {linearParams:N0} parameters in {o.ComputeDType}"
                : $"4-bit decoder weights: {linearParams:N0} parameters at {Bits(quantAll, linearParams)} bits (packed codes, absmax{(o.DoubleQuant ? ", nested absmax and code maps" : "")})",
            [StepMemorySimulation.StreamingWindow] = o.LayerStreaming ? $"{Math.Min(o.StreamingWindow, layers)} resident layers of 4-bit weights ({ByteSize.Format(layerQuant)} each)" : "no layer streaming",
            [StepMemorySimulation.UnquantizedWeights] = $"{(hostEmbedding ? "lm_head" : cfg.TieWordEmbeddings ? "embeddings (tied with lm_head)" : "embeddings, lm_head")}, norms{(biasPerLayer > 0 ? ", biases" : "")} in {o.ComputeDType}",
            [StepMemorySimulation.LoraWeights] = $"{loraParams:N0} {(o.UseDora ? "DoRA" : "LoRA")} parameters (r={o.LoraRank}, {string.Join("/", o.LoraTargets)}{(o.UseDora ? ", magnitude vectors included" : "")}{(o.LoraDropout > 0 ? $", dropout {o.LoraDropout.ToString(CultureInfo.InvariantCulture)}" : "")}) in {o.AdapterDType}",
            [StepMemorySimulation.LoraGradients] = $"LoRA gradients in {o.AdapterDType}",
            [StepMemorySimulation.OptimizerState] = $"AdamW {o.OptimizerBits}-bit state{(o.PagedOptimizer ? ": paged, one tensor's state resident" : "")}",
            [StepMemorySimulation.SavedActivations] = !o.GradientCheckpointing ? "every layer's tensors saved for backward"
                : o.OffloadCheckpoints ? "the recomputed layer's input and the next one's (fetched from the host), RoPE tables, and what the recomputed layer saved for backward"
                : "checkpointed layer inputs, RoPE tables, and what the recomputed layer saved for backward",
            [StepMemorySimulation.LayerWorkingSet] = "intermediates and activation gradients of the layer being computed",
            [StepMemorySimulation.AttentionBuffers] = o.AttentionMask ? "math SDPA score matrices, repeated K/V heads" : "SDPA log-sum-exp, repeated K/V heads",
            [StepMemorySimulation.LossBuffers] = $"loss: selected hidden rows, one chunk of {Math.Min(o.LossChunkTokens, (long)o.MicroBatch * (o.SequenceLength - 1))} tokens' logits (compute dtype and fp32) and their gradients",
            [StepMemorySimulation.DequantBuffers] = !o.QuantizeBase ? "none: the base weights are dense"
                : o.UseDora ? "one weight dequantized for its matmul or its DoRA weight norm (with two float32 row chunks of W and B·A)"
                : "one weight dequantized to the compute dtype for its matmul",
            [StepMemorySimulation.FrameworkOverhead] = o.Device == DeviceKind.Cuda
                ? $"CUDA context ({ByteSize.Format(PlanOptions.CudaContextBytes)}) and library workspaces and kernels ({ByteSize.Format(PlanOptions.CudaWorkspaceBytes)}): estimated, not yet measured"
                : "runtime before any tensor (libtorch, .NET)",
        };
        var components = StepMemorySimulation.Order
            .Select(name => new MemoryComponent(name, sim.AtPeak.GetValueOrDefault(name), descriptions[name]))
            .Where(comp => comp.Bytes != 0 || comp.Name is StepMemorySimulation.QuantizedWeights or StepMemorySimulation.OptimizerState)
            .ToList();
        var host = new List<MemoryComponent>();
        if (o.PagedOptimizer) host.Add(new MemoryComponent("optimizer_state_host", optTotal, "paged AdamW state (memory-mapped file)"));
        if (o.LayerStreaming) host.Add(new MemoryComponent("streamed_weights_host", quantAll, "4-bit decoder weights held in host memory"));
        if (o.GradientCheckpointing && o.OffloadCheckpoints)
            host.Add(new MemoryComponent("checkpoint_offload_host", (long)layers * o.MicroBatch * o.SequenceLength * h * c, "offloaded checkpoint inputs (memory-mapped scratch file)"));
        if (hostEmbedding) host.Add(new MemoryComponent("embedding_host", v * h * c, "input embedding table, read in place from the memory-mapped checkpoint; only a batch's rows reach the device"));
        return new MemoryPlan
        {
            Config = cfg, Options = o, Components = components, PeakBytes = sim.PeakBytes, PeakPhase = sim.PeakPhase,
            HostComponents = host, TrainableParameters = loraParams,
        };
    }

    /// <summary>Single changes first (each re-planned), then all memory-saving switches together, then shorter batches on top.</summary>
    private static IReadOnlyList<PlanSuggestion> Suggest(LlamaConfig cfg, PlanOptions o)
    {
        long budget = o.BudgetBytes!.Value;
        var found = new List<PlanSuggestion>();
        bool Try(string change, PlanOptions changed)
        {
            var p = PlanOnce(cfg, changed);
            if (p.PeakBytes > budget) return false;
            found.Add(new PlanSuggestion(change, changed, p.PeakBytes));
            return true;
        }

        if (!o.GradientCheckpointing) Try("gradient checkpointing on", o with { GradientCheckpointing = true });
        if (!o.PagedOptimizer) Try("paged optimizer", o with { PagedOptimizer = true });
        if (o.OptimizerBits == 32) Try("8-bit optimizer state", o with { OptimizerBits = 8 });
        if (o.LossChunkTokens > 256) Try("loss chunk of 256 tokens", o with { LossChunkTokens = 256 });
        if (o.GradientCheckpointing && !o.OffloadCheckpoints) Try("offloaded checkpoints (layer inputs in host memory)", o with { OffloadCheckpoints = true });
        if (o.AttentionMask) Try("segment attention for packed rows (no [T, T] mask)", o with { AttentionMask = false, SegmentAttention = true });
        if (o.MlpTileTokens == 0 && o.SequenceLength > 4096) Try("sequence-tiled MLP (tiles of 4096 tokens)", o with { MlpTileTokens = 4096 });
        if (o.NormTileTokens == 0 && o.SequenceLength > 4096) Try("token-tiled RMSNorms (tiles of 4096 tokens)", o with { NormTileTokens = 4096 });
        if (!o.AttentionByGroup && cfg.NumKeyValueHeads < cfg.NumAttentionHeads) Try("attention by K/V group (no repeated K/V heads)", o with { AttentionByGroup = true });
        for (int b = o.MicroBatch / 2; b >= 1; b /= 2)
            if (Try($"micro-batch {b} instead of {o.MicroBatch} (raise gradient accumulation to keep the batch)", o with { MicroBatch = b })) break;
        for (int t = o.SequenceLength / 2; t >= 128; t /= 2)
            if (Try($"sequence length {t} instead of {o.SequenceLength}", o with { SequenceLength = t })) break;
        if (!o.LayerStreaming) Try($"layer streaming ({o.StreamingWindow} layers resident)", o with { LayerStreaming = true });
        if (found.Count > 0) return found;

        // Nothing alone fits: the switches that cost little speed together, then smaller batches and sequences on top,
        // first without layer streaming (it costs host-to-device traffic every step), then with it.
        var free = o with
        {
            GradientCheckpointing = true, OffloadCheckpoints = true, PagedOptimizer = true, AttentionMask = false, SegmentAttention = o.AttentionMask || o.SegmentAttention, OptimizerBits = 8, LossChunkTokens = Math.Min(o.LossChunkTokens, 256),
            MlpTileTokens = o.MlpTileTokens > 0 ? o.MlpTileTokens : o.SequenceLength > 4096 ? 4096 : 0,
            NormTileTokens = o.NormTileTokens > 0 ? o.NormTileTokens : o.SequenceLength > 4096 ? 4096 : 0,
            AttentionByGroup = o.AttentionByGroup || (o.SequenceLength > 4096 && cfg.NumKeyValueHeads < cfg.NumAttentionHeads),
        };
        string freeText = "offloaded checkpointing, paged 8-bit optimizer, loss chunk 256" + (free.MlpTileTokens > 0 ? $", MLP in tiles of {free.MlpTileTokens}" : "")
            + (free.NormTileTokens > 0 ? $", norms in tiles of {free.NormTileTokens}" : "") + (free.AttentionByGroup ? ", attention by K/V group" : "") + (free.SegmentAttention ? ", segment attention" : "");
        foreach (var (baseOptions, switches) in new[]
                 {
                     (free, freeText),
                     (free with { LayerStreaming = true }, freeText + ", layer streaming"),
                 })
        {
            if (Try(switches, baseOptions)) return found;
            for (int b = o.MicroBatch / 2; b >= 1; b /= 2)
                if (Try($"{switches}, micro-batch {b}", baseOptions with { MicroBatch = b })) return found;
            for (int t = o.SequenceLength / 2; t >= 128; t /= 2)
                if (Try($"{switches}, micro-batch 1, sequence length {t}", baseOptions with { MicroBatch = 1, SequenceLength = t })) return found;
        }
        return found;
    }
}
