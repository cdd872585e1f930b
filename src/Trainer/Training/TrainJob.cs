using System.Text.Json.Serialization;

namespace QLora.Trainer;

/// <summary>
/// A training job as <c>appsettings.json</c> describes it: one section per concern, bound by <see cref="JobConfiguration"/>
/// (JSON file, then <c>QLORA_</c> environment variables, then command-line overrides) and validated before anything loads.
/// Defaults follow Hugging Face PEFT/transformers where they have one.
/// </summary>
public sealed class TrainJob
{
    /// <summary>The base model.</summary>
    public ModelSection Model { get; set; } = new();
    /// <summary>How the base weights are quantized on load.</summary>
    public QuantizationSection Quantization { get; set; } = new();
    /// <summary>The adapters.</summary>
    public LoraSection Lora { get; set; } = new();
    /// <summary>The datasets and how they become token rows.</summary>
    public DataSection Data { get; set; } = new();
    /// <summary>The optimisation loop.</summary>
    public TrainingSection Training { get; set; } = new();
    /// <summary>Evaluation during and after training.</summary>
    public EvalSection Eval { get; set; } = new();
    /// <summary>Where results and checkpoints go.</summary>
    public OutputSection Output { get; set; } = new();
    /// <summary>The memory budget the job must fit.</summary>
    public MemorySection Memory { get; set; } = new();

    /// <summary>Every problem with the values, each naming the key, the value and what is allowed (empty when valid).</summary>
    public IReadOnlyList<string> Validate()
    {
        var e = new List<string>();
        Model.Validate(e);
        Quantization.Validate(e);
        Lora.Validate(e);
        Data.Validate(e);
        Training.Validate(e);
        Eval.Validate(e);
        Output.Validate(e);
        Memory.Validate(e);
        if (Model.Stream && !Quantization.QuantizesBase)
            e.Add("Model:Stream = true: layer streaming reads 4-bit weights, and Quantization:QuantType none keeps the base 16-bit; set Model:Stream false or quantize the base (nf4)");
        return e;
    }

    internal static void Check(List<string> errors, bool ok, string key, object? value, string allowed)
    {
        if (!ok) errors.Add($"{key} = {Show(value)}: {allowed}");
    }

    internal static void OneOf(List<string> errors, string key, string? value, params string[] allowed)
    {
        if (value is null || !allowed.Contains(value, StringComparer.OrdinalIgnoreCase))
            errors.Add($"{key} = {Show(value)}: allowed values are {string.Join(", ", allowed)}");
    }

    static string Show(object? v) => v switch
    {
        null => "(missing)",
        string s => $"'{s}'",
        double d => d.ToString("R", System.Globalization.CultureInfo.InvariantCulture),
        _ => Convert.ToString(v, System.Globalization.CultureInfo.InvariantCulture) ?? "",
    };
}

/// <summary>The <c>Model</c> section.</summary>
public sealed class ModelSection
{
    /// <summary>A Hugging Face model folder (config.json, safetensors, tokenizer.json), or a bnb-4bit folder.</summary>
    public string? Path { get; set; }
    /// <summary>Compute dtype of activations and dequantized weights: bfloat16, float16 or float32.</summary>
    public string ComputeDType { get; set; } = "bfloat16";
    /// <summary>Chat template by name (llama3, llama3.1, chatml, mistral, alpaca); default: the tokenizer's, else alpaca.</summary>
    public string? ChatTemplate { get; set; }
    /// <summary>
    /// Layer streaming (bnb-4bit folders only): the decoder layers' 4-bit weights stay in the memory-mapped checkpoint
    /// and only <see cref="StreamWindow"/> layers are resident at once, for models whose weights exceed the budget.
    /// </summary>
    public bool Stream { get; set; }
    /// <summary>Decoder layers resident at once when streaming (the one computing and the one being prefetched).</summary>
    public int StreamWindow { get; set; } = 2;
    /// <summary>A base weight holding NaN or infinity: stop (default: refused, naming the tensor) or warn (logged, training goes on).</summary>
    public string NonFiniteWeights { get; set; } = "stop";
    /// <summary>Where the job computes: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N.</summary>
    public string Device { get; set; } = "auto";

    internal void Validate(List<string> e)
    {
        TrainJob.OneOf(e, "Model:NonFiniteWeights", NonFiniteWeights, "stop", "warn");
        TrainJob.Check(e, !string.IsNullOrWhiteSpace(Path), "Model:Path", Path, "a Hugging Face model folder is required");
        TrainJob.Check(e, StreamWindow >= 1, "Model:StreamWindow", StreamWindow, "must be at least 1");
        TrainJob.Check(e, DeviceRequest.TryParse(Device, out _), "Model:Device", Device, $"allowed values are {DeviceRequest.Allowed}");
        TrainJob.OneOf(e, "Model:ComputeDType", ComputeDType, "bfloat16", "float16", "float32");
        if (ChatTemplate is not null) TrainJob.OneOf(e, "Model:ChatTemplate", ChatTemplate, [.. QLora.Trainer.ChatTemplate.Names]);
    }
}

/// <summary>The <c>Quantization</c> section (bitsandbytes' BitsAndBytesConfig in spirit).</summary>
public sealed class QuantizationSection
{
    /// <summary>
    /// nf4 or fp4 (the 4-bit base of QLoRA), or none: plain LoRA, the frozen base kept in the compute dtype as dense
    /// Linear weights (a bnb-4bit folder is dequantized on load).
    /// </summary>
    public string QuantType { get; set; } = "nf4";
    /// <summary>False for QuantType none: the base stays 16-bit (Blocksize and DoubleQuant are then unused).</summary>
    [JsonIgnore]
    public bool QuantizesBase => !string.Equals(QuantType, "none", StringComparison.OrdinalIgnoreCase);
    /// <summary>Weights per absmax block (bitsandbytes' default 64).</summary>
    public int Blocksize { get; set; } = 64;
    /// <summary>Quantize the absmax values too (QLoRA's double quantization).</summary>
    public bool DoubleQuant { get; set; } = true;

    internal void Validate(List<string> e)
    {
        TrainJob.OneOf(e, "Quantization:QuantType", QuantType, "nf4", "fp4", "none");
        TrainJob.Check(e, Blocksize is >= 32 and <= 4096 && (Blocksize & (Blocksize - 1)) == 0, "Quantization:Blocksize", Blocksize, "a power of two from 32 to 4096");
    }
}

/// <summary>The <c>Lora</c> section (PEFT's LoraConfig).</summary>
public sealed class LoraSection
{
    /// <summary>Adapter rank r.</summary>
    public int Rank { get; set; } = 16;
    /// <summary>lora_alpha; the update is scaled by alpha/r (alpha/√r with rsLoRA).</summary>
    public double Alpha { get; set; } = 16;
    /// <summary>Dropout on the adapter input.</summary>
    public double Dropout { get; set; }
    /// <summary>Rank-stabilised scaling.</summary>
    public bool UseRsLora { get; set; }
    /// <summary>DoRA (PEFT's use_dora): also train a magnitude vector per adapted layer, the weight's direction from LoRA.</summary>
    public bool UseDora { get; set; }
    /// <summary>Module names to adapt (absent: every linear layer). A list in the job replaces the default, it does not extend it.</summary>
    public List<string>? TargetModules { get; set; }
    /// <summary>A regex over full module names instead of <see cref="TargetModules"/>.</summary>
    public string? TargetRegex { get; set; }
    /// <summary>Modules never adapted (PEFT's exclude_modules list: full names or dot-delimited suffixes).</summary>
    public List<string>? ExcludeModules { get; set; }
    /// <summary>Only these layer indices (PEFT's layers_to_transform).</summary>
    public List<int>? LayersToTransform { get; set; }
    /// <summary>
    /// PEFT's rank_pattern: {"pattern": rank} for modules whose name ends in (a regex over) the pattern after a dot, e.g.
    /// <c>{"mlp.down_proj": 32}</c> or <c>{"layers\.0\..*": 4}</c>. The job file's keys are tried in sorted order.
    /// </summary>
    public Dictionary<string, int>? RankPattern { get; set; }
    /// <summary>PEFT's alpha_pattern: {"pattern": alpha}, matched as <see cref="RankPattern"/>.</summary>
    public Dictionary<string, double>? AlphaPattern { get; set; }
    /// <summary>kaiming (PEFT's default) or gaussian.</summary>
    public string Init { get; set; } = "kaiming";
    /// <summary>Master-weight dtype of the adapters: float32 or bfloat16.</summary>
    public string DType { get; set; } = "float32";

    static void CheckRegex(List<string> e, string key, string pattern)
    {
        try { _ = new System.Text.RegularExpressions.Regex(pattern); }
        catch (ArgumentException x) { e.Add($"{key} = '{pattern}': not a valid regular expression ({x.Message})"); }
    }

    internal void Validate(List<string> e)
    {
        TrainJob.Check(e, Rank is >= 1 and <= 4096, "Lora:Rank", Rank, "an integer from 1 to 4096");
        TrainJob.Check(e, Alpha > 0 && double.IsFinite(Alpha), "Lora:Alpha", Alpha, "a positive number");
        TrainJob.Check(e, Dropout is >= 0 and < 1, "Lora:Dropout", Dropout, "a number in [0, 1)");
        TrainJob.Check(e, TargetModules is null or { Count: > 0 } || TargetRegex is not null, "Lora:TargetModules", "[]", "at least one module name (e.g. q_proj) or a TargetRegex");
        if (TargetRegex is not null) CheckRegex(e, "Lora:TargetRegex", TargetRegex);
        if (TargetRegex is not null && LayersToTransform is not null)
            e.Add("Lora:TargetRegex and Lora:LayersToTransform cannot be used together (PEFT: layers_to_transform cannot be used when target_modules is a str); put the layer indices into the regex or use Lora:TargetModules");
        if (LayersToTransform is not null)
            TrainJob.Check(e, LayersToTransform.All(i => i >= 0), "Lora:LayersToTransform", string.Join(",", LayersToTransform), "non-negative layer indices");
        foreach (var (key, r) in RankPattern ?? [])
        {
            TrainJob.Check(e, r is >= 1 and <= 4096, $"Lora:RankPattern:{key}", r, "an integer from 1 to 4096");
            CheckRegex(e, $"Lora:RankPattern:{key}", key);
        }
        foreach (var (key, a) in AlphaPattern ?? [])
        {
            TrainJob.Check(e, a > 0 && double.IsFinite(a), $"Lora:AlphaPattern:{key}", a, "a positive number");
            CheckRegex(e, $"Lora:AlphaPattern:{key}", key);
        }
        TrainJob.OneOf(e, "Lora:Init", Init, "kaiming", "gaussian");
        TrainJob.OneOf(e, "Lora:DType", DType, "float32", "bfloat16");
    }
}

/// <summary>The <c>Data</c> section.</summary>
public sealed class DataSection
{
    /// <summary>Training JSONL file.</summary>
    public string? TrainFile { get; set; }
    /// <summary>Evaluation JSONL file; when absent, <see cref="EvalFraction"/> of the training samples is held out.</summary>
    public string? EvalFile { get; set; }
    /// <summary>Fraction of training samples held out for evaluation when there is no EvalFile (0 disables evaluation).</summary>
    public double EvalFraction { get; set; } = 0.05;
    /// <summary>auto (detected per line), text, instruction or chat.</summary>
    public string Format { get; set; } = "auto";
    /// <summary>Rows are at most this many tokens; longer samples are truncated (and counted).</summary>
    public int MaxSeqLength { get; set; } = 512;
    /// <summary>Pack samples into full rows (no cross-sample attention or positions); false pads length-grouped batches.</summary>
    public bool Packing { get; set; } = true;
    /// <summary>Compute loss on prompt tokens too (default: on response tokens only).</summary>
    public bool TrainOnPrompt { get; set; }
    /// <summary>stop (default) or skip: what a malformed JSONL line does.</summary>
    public string MalformedLines { get; set; } = "stop";
    /// <summary>Shuffle training rows each epoch (deterministically from the seed).</summary>
    public bool Shuffle { get; set; } = true;

    internal void Validate(List<string> e)
    {
        TrainJob.Check(e, !string.IsNullOrWhiteSpace(TrainFile), "Data:TrainFile", TrainFile, "a JSONL file of training samples is required");
        TrainJob.Check(e, EvalFraction is >= 0 and < 1, "Data:EvalFraction", EvalFraction, "a number in [0, 1)");
        TrainJob.OneOf(e, "Data:Format", Format, "auto", "text", "instruction", "chat");
        TrainJob.Check(e, MaxSeqLength is >= 8 and <= 1 << 20, "Data:MaxSeqLength", MaxSeqLength, "an integer from 8 to 1048576");
        TrainJob.OneOf(e, "Data:MalformedLines", MalformedLines, "stop", "skip");
    }
}

/// <summary>The <c>Training</c> section.</summary>
public sealed class TrainingSection
{
    /// <summary>Seeds adapter initialisation, data order and dropout: a CPU run with the same seed is bit-reproducible.</summary>
    public int Seed { get; set; } = 42;
    /// <summary>Optimizer steps; 0 means <see cref="Epochs"/> passes over the data.</summary>
    public int MaxSteps { get; set; }
    /// <summary>Passes over the training data when MaxSteps is 0.</summary>
    public double Epochs { get; set; } = 1;
    /// <summary>Rows per forward/backward pass.</summary>
    public int MicroBatchSize { get; set; } = 1;
    /// <summary>Micro-batches per optimizer step; the loss is normalised by the target tokens of all of them.</summary>
    public int GradientAccumulationSteps { get; set; } = 1;
    /// <summary>Peak learning rate.</summary>
    public double LearningRate { get; set; } = 2e-4;
    /// <summary>cosine, linear or constant decay after warmup.</summary>
    public string Scheduler { get; set; } = "cosine";
    /// <summary>Linear warmup steps from 0 to the peak rate.</summary>
    public int WarmupSteps { get; set; }
    /// <summary>The rate decays to this fraction of the peak.</summary>
    public double MinLearningRateRatio { get; set; }
    /// <summary>Decoupled weight decay.</summary>
    public double WeightDecay { get; set; }
    /// <summary>Clip the global gradient norm to this (0 disables).</summary>
    public double MaxGradNorm { get; set; } = 1.0;
    /// <summary>LoRA+: lora_B learns this many times faster than lora_A (1 = plain LoRA).</summary>
    public double LoraPlusRatio { get; set; } = 1;
    /// <summary>adamw (32-bit state) or adamw8bit (bitsandbytes' blockwise 8-bit state).</summary>
    public string Optimizer { get; set; } = "adamw";
    /// <summary>Keep optimizer state in host memory, paged in per tensor.</summary>
    public bool PagedOptimizer { get; set; }
    /// <summary>Recompute each decoder layer in backward instead of keeping its activations.</summary>
    public bool GradientCheckpointing { get; set; } = true;
    /// <summary>Tokens per chunk of the fp32 cross-entropy (bounds the logits buffer).</summary>
    public int LossChunkTokens { get; set; } = 256;
    /// <summary>
    /// With GradientCheckpointing: each layer's input goes to host memory after its forward and comes back for its
    /// recompute (a memory-mapped scratch file on the CPU backend); bit-identical results, less device memory.
    /// </summary>
    public bool OffloadCheckpoints { get; set; } = true;
    /// <summary>
    /// Sequence-tiled MLP: tokens per tile (0: off). Each tile of every layer's MLP is checkpointed on its own, so no
    /// [tokens, intermediate] tensor of the whole sequence exists: for long sequences. Same loss; LoRA gradients
    /// equal up to the summation order.
    /// </summary>
    public int MlpTileTokens { get; set; }
    /// <summary>
    /// Token-tiled RMSNorms: tokens per tile (0: off). Each norm saves its input and one float32 scale per token instead
    /// of a float32 copy of the input, and computes its gradient tile by tile: for long sequences. Same loss; gradients
    /// equal up to float32 rounding.
    /// </summary>
    public int NormTileTokens { get; set; }
    /// <summary>
    /// Grouped-query attention a key/value group at a time, without repeated K/V heads, each group recomputed in
    /// backward: for long sequences on models with fewer K/V heads than query heads (Llama 3, Qwen). Same loss; K/V
    /// gradients equal up to summation order; one more attention forward per layer.
    /// </summary>
    public bool AttentionByGroup { get; set; }
    /// <summary>The three long-context switches above, to set on a model.</summary>
    [JsonIgnore]
    public LongContextSwitches LongContext => new(MlpTileTokens, NormTileTokens, AttentionByGroup);
    /// <summary>
    /// Packed rows attend segment by segment on the memory-efficient attention path instead of through a [T, T] mask
    /// whose size grows with the square of the row; same result up to rounding.
    /// </summary>
    public bool SegmentAttention { get; set; }
    /// <summary>Stop after this many consecutive steps with a non-finite loss or gradient.</summary>
    public int MaxConsecutiveBadSteps { get; set; } = 5;
    /// <summary>CPU threads for libtorch (0: libtorch's default; under MPI, the cores divided among the ranks on the machine).</summary>
    public int Threads { get; set; }
    /// <summary>auto: data-parallel over MPI when started by an MPI launcher (mpirun, srun) with more than one rank; off: one process.</summary>
    public string DataParallel { get; set; } = "auto";
    /// <summary>Seconds a collective waits for the slowest rank before the job stops with an error naming the missing rank.</summary>
    public int CollectiveTimeoutSeconds { get; set; } = 600;

    internal void Validate(List<string> e)
    {
        TrainJob.Check(e, MaxSteps >= 0, "Training:MaxSteps", MaxSteps, "0 (use Epochs) or a positive integer");
        TrainJob.Check(e, MaxSteps > 0 || Epochs > 0 && double.IsFinite(Epochs), "Training:Epochs", Epochs, "a positive number when MaxSteps is 0");
        TrainJob.Check(e, MicroBatchSize is >= 1 and <= 4096, "Training:MicroBatchSize", MicroBatchSize, "an integer from 1 to 4096");
        TrainJob.Check(e, GradientAccumulationSteps is >= 1 and <= 65536, "Training:GradientAccumulationSteps", GradientAccumulationSteps, "an integer from 1 to 65536");
        TrainJob.Check(e, LearningRate > 0 && LearningRate < 1, "Training:LearningRate", LearningRate, "a number in (0, 1)");
        TrainJob.OneOf(e, "Training:Scheduler", Scheduler, "cosine", "linear", "constant");
        TrainJob.Check(e, WarmupSteps >= 0, "Training:WarmupSteps", WarmupSteps, "a non-negative integer");
        TrainJob.Check(e, MinLearningRateRatio is >= 0 and <= 1, "Training:MinLearningRateRatio", MinLearningRateRatio, "a number in [0, 1]");
        TrainJob.Check(e, WeightDecay is >= 0 and < 1, "Training:WeightDecay", WeightDecay, "a number in [0, 1)");
        TrainJob.Check(e, MaxGradNorm >= 0 && double.IsFinite(MaxGradNorm), "Training:MaxGradNorm", MaxGradNorm, "0 (off) or a positive number");
        TrainJob.Check(e, LoraPlusRatio >= 1 && double.IsFinite(LoraPlusRatio), "Training:LoraPlusRatio", LoraPlusRatio, "a number >= 1 (1 = plain LoRA; LoRA+ suggests 16)");
        TrainJob.OneOf(e, "Training:Optimizer", Optimizer, "adamw", "adamw8bit");
        TrainJob.Check(e, LossChunkTokens is >= 1 and <= 1 << 20, "Training:LossChunkTokens", LossChunkTokens, "an integer from 1 to 1048576");
        TrainJob.Check(e, MlpTileTokens is >= 0 and <= 1 << 20, "Training:MlpTileTokens", MlpTileTokens, "0 (off) or a tile of up to 1048576 tokens");
        TrainJob.Check(e, NormTileTokens is >= 0 and <= 1 << 20, "Training:NormTileTokens", NormTileTokens, "0 (off) or a tile of up to 1048576 tokens");
        TrainJob.Check(e, MaxConsecutiveBadSteps >= 1, "Training:MaxConsecutiveBadSteps", MaxConsecutiveBadSteps, "a positive integer");
        TrainJob.Check(e, Threads is >= 0 and <= 1024, "Training:Threads", Threads, "0 (default) or a thread count");
        TrainJob.OneOf(e, "Training:DataParallel", DataParallel, "auto", "off");
        TrainJob.Check(e, CollectiveTimeoutSeconds is >= 1 and <= 86400, "Training:CollectiveTimeoutSeconds", CollectiveTimeoutSeconds, "an integer from 1 to 86400");
    }
}

/// <summary>The <c>Eval</c> section.</summary>
public sealed class EvalSection
{
    /// <summary>Evaluate every N optimizer steps (0: only at the end).</summary>
    public int EveryNSteps { get; set; }
    /// <summary>At most this many eval rows for the eval loss (0: all).</summary>
    public int MaxRows { get; set; }
    /// <summary>Measure greedy exact-match accuracy on the eval samples that have a reference answer, before and after training.</summary>
    public bool ExactMatch { get; set; }
    /// <summary>At most this many samples for exact match (0: all).</summary>
    public int ExactMatchSamples { get; set; }
    /// <summary>Generation length limit for exact match and prompts.</summary>
    public int MaxNewTokens { get; set; } = 32;
    /// <summary>Fixed prompts whose greedy completions are written to the log at each evaluation.</summary>
    public List<string>? Prompts { get; set; }
    /// <summary>
    /// Samples decoded together in exact match and prompt completion (left-padded batches sharing one KV cache; 1 decodes
    /// one at a time). Larger batches run fewer, larger steps; the answers are the same.
    /// </summary>
    public int BatchSize { get; set; } = 16;
    /// <summary>
    /// A JSONL file of multiple-choice items (<c>{"question", "choices", "answer"}</c>) scored by log-likelihood before
    /// and after training (acc and acc_norm, as lm-evaluation-harness scores them); absent: none.
    /// </summary>
    public string? ChoicesFile { get; set; }

    internal void Validate(List<string> e)
    {
        TrainJob.Check(e, EveryNSteps >= 0, "Eval:EveryNSteps", EveryNSteps, "0 (only at the end) or a positive integer");
        TrainJob.Check(e, MaxRows >= 0, "Eval:MaxRows", MaxRows, "0 (all) or a positive integer");
        TrainJob.Check(e, ExactMatchSamples >= 0, "Eval:ExactMatchSamples", ExactMatchSamples, "0 (all) or a positive integer");
        TrainJob.Check(e, MaxNewTokens is >= 1 and <= 65536, "Eval:MaxNewTokens", MaxNewTokens, "an integer from 1 to 65536");
        TrainJob.Check(e, BatchSize is >= 1 and <= 4096, "Eval:BatchSize", BatchSize, "an integer from 1 to 4096");
    }
}

/// <summary>The <c>Output</c> section.</summary>
public sealed class OutputSection
{
    /// <summary>The run's folder: the final adapter, job.json, run_summary.json, loss.png, checkpoints/.</summary>
    public string? Dir { get; set; }
    /// <summary>Save a checkpoint every N optimizer steps (0: only at the end).</summary>
    public int SaveEveryNSteps { get; set; }
    /// <summary>Keep the newest K checkpoints.</summary>
    public int KeepLast { get; set; } = 3;
    /// <summary>Start afresh in a folder that holds a previous run (its results and checkpoints are replaced).</summary>
    public bool Overwrite { get; set; }

    internal void Validate(List<string> e)
    {
        TrainJob.Check(e, !string.IsNullOrWhiteSpace(Dir), "Output:Dir", Dir, "an output folder is required");
        TrainJob.Check(e, SaveEveryNSteps >= 0, "Output:SaveEveryNSteps", SaveEveryNSteps, "0 (only at the end) or a positive integer");
        TrainJob.Check(e, KeepLast >= 1, "Output:KeepLast", KeepLast, "a positive integer");
    }
}

/// <summary>The <c>Memory</c> section.</summary>
public sealed class MemorySection
{
    /// <summary>The peak memory the job may use, e.g. "24GB", "8GiB", "6000MB" (empty: no limit).</summary>
    public string? Budget { get; set; }

    /// <summary>The budget in bytes, or null when unlimited.</summary>
    [JsonIgnore]
    public long? BudgetBytes => string.IsNullOrWhiteSpace(Budget) ? null : ByteSize.Parse(Budget);

    internal void Validate(List<string> e)
    {
        if (string.IsNullOrWhiteSpace(Budget)) return;
        if (!ByteSize.TryParse(Budget, out var b) || b <= 0)
            e.Add($"Memory:Budget = '{Budget}': a size such as 24GB, 8GiB, 6000MB or a byte count");
    }
}
