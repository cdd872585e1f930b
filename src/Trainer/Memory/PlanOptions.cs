using QLora.Kernels;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// The settings of a training job that decide its memory, as plain values so that any caller (the job configuration,
/// <c>qlora plan</c>, <c>qlora bench memory</c>) can ask <see cref="MemoryPlanner.Plan"/> for a plan. Defaults are the
/// QLoRA recipe this project trains with: NF4 blocksize 64 with double quantization, bf16 compute, LoRA r 16 on every
/// linear layer with float32 master weights, gradient checkpointing, paged 32-bit AdamW.
/// </summary>
public sealed record PlanOptions
{
    /// <summary>Tokens per sequence.</summary>
    public int SequenceLength { get; init; } = 2048;
    /// <summary>Sequences per micro-batch (per forward/backward).</summary>
    public int MicroBatch { get; init; } = 1;
    /// <summary>LoRA rank r.</summary>
    public int LoraRank { get; init; } = 16;
    /// <summary>
    /// LoRA dropout probability: above 0 each adapted projection keeps its own dropped copy of its input and the dropout
    /// noise (CPU: a tensor of the input's dtype; CUDA: a bool mask) for backward, instead of sharing the input.
    /// </summary>
    public double LoraDropout { get; init; }
    /// <summary>Projections that get adapters (last name segment, PEFT style).</summary>
    public IReadOnlyList<string> LoraTargets { get; init; } = LoraOptions.AllLinear;
    /// <summary>
    /// DoRA (PEFT's use_dora): a magnitude vector [out] per adapted projection (with its gradient and optimizer state),
    /// a weight norm per adapted projection and forward (a dequantized weight and float32 row chunks), and the base
    /// output and B(A(x)) saved for backward.
    /// </summary>
    public bool UseDora { get; init; }
    /// <summary>dtype of the LoRA master weights (and so of their gradients): Float32 (default) or BFloat16.</summary>
    public ScalarType AdapterDType { get; init; } = ScalarType.Float32;
    /// <summary>
    /// The decoder projections are 4-bit (QLoRA, default); false: plain LoRA, frozen dense weights in the compute dtype,
    /// with no dequantized tile per matmul.
    /// </summary>
    public bool QuantizeBase { get; init; } = true;
    /// <summary>Elements per absmax block of the 4-bit weights.</summary>
    public int QuantBlocksize { get; init; } = 64;
    /// <summary>Double quantization of the absmax (8-bit codes, 256 per nested block).</summary>
    public bool DoubleQuant { get; init; } = true;
    /// <summary>The dtype activations, embeddings, norms, lm_head and dequantized weight tiles use.</summary>
    public ScalarType ComputeDType { get; init; } = ScalarType.BFloat16;
    /// <summary>Recompute each decoder layer in backward, keeping only its input.</summary>
    public bool GradientCheckpointing { get; init; } = true;
    /// <summary>
    /// Offloaded checkpoints (with <see cref="GradientCheckpointing"/>): each layer's input leaves device memory after
    /// its forward (to host memory) and comes back one layer ahead of its recompute (<see cref="ActivationOffload"/>).
    /// </summary>
    public bool OffloadCheckpoints { get; init; } = true;
    /// <summary>Sequence-tiled MLP: tokens per tile, each tile checkpointed on its own (0: off; see <see cref="LlamaMlp.TileTokens"/>).</summary>
    public int MlpTileTokens { get; init; }
    /// <summary>Token-tiled RMSNorms: tokens per tile (0: off; see <see cref="RmsNorm.TileTokens"/>).</summary>
    public int NormTileTokens { get; init; }
    /// <summary>Grouped-query attention a K/V group at a time, recomputed in backward (see <see cref="GroupedQueryAttention"/>).</summary>
    public bool AttentionByGroup { get; init; }
    /// <summary>AdamW state bits: 32 (float32 moments) or 8 (blockwise 8-bit moments).</summary>
    public int OptimizerBits { get; init; } = 32;
    /// <summary>Paged optimizer: state in host memory, one tensor's state brought into device memory per update.</summary>
    public bool PagedOptimizer { get; init; } = true;
    /// <summary>Tokens per chunk of the fp32 loss's logits (<see cref="LlamaForCausalLM.LossChunkTokens"/>).</summary>
    public int LossChunkTokens { get; init; } = LlamaForCausalLM.DefaultLossChunkTokens;
    /// <summary>Layer streaming: the 4-bit weights stay in host memory and only a window of layers is resident.</summary>
    public bool LayerStreaming { get; init; }
    /// <summary>Decoder layers resident at once when streaming (the one computing and the one being prefetched).</summary>
    public int StreamingWindow { get; init; } = 2;
    /// <summary>
    /// The input embedding table of an untied model stays in host memory (the memory-mapped checkpoint) and only the
    /// rows of a batch reach the device (<see cref="FrozenEmbedding.OnHost"/>); a tied table is needed whole by lm_head
    /// and stays on the device either way.
    /// </summary>
    public bool HostEmbedding { get; init; } = true;
    /// <summary>
    /// Packed rows attend segment by segment (no mask: the memory-efficient path; the segments' outputs are joined by
    /// one copy). Used instead of <see cref="AttentionMask"/>.
    /// </summary>
    public bool SegmentAttention { get; init; }
    /// <summary>An explicit attention mask (packed sequences): SDPA falls back to the math path, which materialises B·heads·T² scores.</summary>
    public bool AttentionMask { get; init; }
    /// <summary>
    /// Memory the runtime takes before any tensor exists (on the CPU backend the .NET runtime plus libtorch's resident
    /// anonymous memory, measured; on a GPU it would be the CUDA context). Counted once in the peak.
    /// </summary>
    public long FrameworkOverheadBytes { get; init; } = DefaultFrameworkOverheadBytes;
    /// <summary>The budget the peak is compared with, or null for none.</summary>
    public long? BudgetBytes { get; init; }
    /// <summary>
    /// The device the job runs on. On CUDA the runtime term is the CUDA context plus the libraries' workspaces and
    /// kernel images (<see cref="CudaContextBytes"/> + <see cref="CudaWorkspaceBytes"/>) instead of
    /// <see cref="FrameworkOverheadBytes"/>, which is host memory there.
    /// </summary>
    public DeviceKind Device { get; init; } = DeviceKind.Cpu;

    /// <summary>
    /// Device memory a CUDA context takes when it is created (the driver's reservation for it, libtorch's first
    /// allocation). An estimate for Hopper-class cards with lazy module loading, not yet measured by this project.
    /// </summary>
    public const long CudaContextBytes = 512L << 20;

    /// <summary>
    /// Device memory libraries take after the context exists: cuBLAS/cuBLASLt workspaces and the kernel images loaded
    /// on first use. An estimate, not yet measured by this project.
    /// </summary>
    public const long CudaWorkspaceBytes = 256L << 20;

    /// <summary>The runtime's share of the peak on the planned device.</summary>
    public long RuntimeOverheadBytes => Device == DeviceKind.Cuda ? CudaContextBytes + CudaWorkspaceBytes : FrameworkOverheadBytes;

    /// <summary>
    /// The framework overhead used when none is given (see <see cref="FrameworkOverheadBytes"/>): the CPU backend's,
    /// measured as resident anonymous memory of a test host after libtorch's first op (85 MB), plus room for the code a
    /// step JIT-compiles. A CUDA context (several hundred MB) is not in it: a GPU job should pass its own figure.
    /// </summary>
    public const long DefaultFrameworkOverheadBytes = 96L << 20;

    /// <summary>Checks every value; throws <see cref="ArgumentException"/> naming the bad one and what is allowed.</summary>
    public void Validate()
    {
        foreach (var (name, v) in new[] { ("SequenceLength", SequenceLength), ("MicroBatch", MicroBatch), ("LoraRank", LoraRank),
                     ("QuantBlocksize", QuantBlocksize), ("LossChunkTokens", LossChunkTokens), ("StreamingWindow", StreamingWindow) })
            if (v <= 0) throw new ArgumentException($"{name} {v}: must be positive");
        if (MlpTileTokens < 0) throw new ArgumentException($"MlpTileTokens {MlpTileTokens}: must be 0 (off) or positive");
        if (NormTileTokens < 0) throw new ArgumentException($"NormTileTokens {NormTileTokens}: must be 0 (off) or positive");
        if (!(LoraDropout >= 0 && LoraDropout < 1)) throw new ArgumentException($"LoraDropout {LoraDropout}: must be in [0, 1)");
        if (SequenceLength < 2) throw new ArgumentException($"SequenceLength {SequenceLength}: needs at least 2 tokens for a next-token loss");
        foreach (var t in LoraTargets)
            if (!LoraOptions.AllLinear.Contains(t))
                throw new ArgumentException($"LoRA target '{t}' is not a projection of a Llama layer; use {string.Join(", ", LoraOptions.AllLinear)}");
        if (AdapterDType is not (ScalarType.Float32 or ScalarType.BFloat16)) throw new ArgumentException($"AdapterDType {AdapterDType}: must be Float32 or BFloat16");
        if (ComputeDType is not (ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float32))
            throw new ArgumentException($"ComputeDType {ComputeDType}: must be BFloat16, Float16 or Float32");
        if (!QuantizeBase && LayerStreaming) throw new ArgumentException("LayerStreaming streams 4-bit weights; a 16-bit base (QuantizeBase false) is not streamed");
        if (OptimizerBits is not (32 or 8)) throw new ArgumentException($"OptimizerBits {OptimizerBits}: must be 32 or 8");
        if (FrameworkOverheadBytes < 0) throw new ArgumentException($"FrameworkOverheadBytes {FrameworkOverheadBytes}: must be >= 0");
        if (BudgetBytes is <= 0) throw new ArgumentException($"BudgetBytes {BudgetBytes}: must be positive");
    }
}
