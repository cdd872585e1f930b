using QLora.Quant;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// A Llama-family causal LM in Hugging Face naming (<c>model.embed_tokens</c>, <c>model.layers.N...</c>,
/// <c>model.norm</c>, <c>lm_head</c>), with frozen 4-bit (or dense) projections, optional LoRA adapters on chosen
/// projections, per-layer gradient checkpointing (on by default) and the chunked fp32 loss.
/// </summary>
public sealed class LlamaForCausalLM : nn.Module
{
    private readonly RotaryEmbedding[] _ropes;  // the distinct RoPEs of the layers (usually one)
    private readonly int[] _ropeOfLayer;       // index into _ropes per decoder layer
    private readonly nn.Module<Tensor, Tensor>? _lmHead;
    private readonly List<(string Name, LoraLinear Layer)> _lora = [];

    private LlamaForCausalLM(LlamaConfig config, LlamaModel model, nn.Module<Tensor, Tensor>? lmHead, ScalarType computeDType) : base("LlamaForCausalLM")
    {
        Config = config;
        ComputeDType = computeDType;
        this.model = model;
        _lmHead = lmHead;
        var distinct = Enumerable.Range(0, config.NumHiddenLayers).Select(config.RopeForLayer).Distinct().ToList();
        if (distinct.Count == 0) distinct.Add(config.RopeForLayer(0));
        _ropes = distinct.Select(r => new RotaryEmbedding(config.HeadDim, r.Theta, r.Scaling)).ToArray();
        _ropeOfLayer = Enumerable.Range(0, config.NumHiddenLayers).Select(i => distinct.IndexOf(config.RopeForLayer(i))).ToArray();
        register_module("model", model);
        if (lmHead is not null) register_module("lm_head", lmHead);
    }

    /// <summary>The architecture.</summary>
    public LlamaConfig Config { get; }
    /// <summary>The dtype activations and dequantized weights use.</summary>
    public ScalarType ComputeDType { get; }
    /// <summary>Embeddings, decoder layers and final norm.</summary>
    public LlamaModel model { get; }
    /// <summary>Recompute each decoder layer in backward instead of keeping its activations (default on).</summary>
    public bool GradientCheckpointing { get; set; } = true;
    /// <summary>
    /// Offloaded checkpoints (with <see cref="GradientCheckpointing"/>): each layer's input leaves device memory after its
    /// forward and comes back, one layer ahead, for its recompute (<see cref="ActivationOffload"/>). Bit-identical results.
    /// </summary>
    public bool OffloadCheckpoints
    {
        get => _offload is not null;
        set
        {
            if (value == OffloadCheckpoints) return;
            _offload?.Dispose();
            _offload = value ? new ActivationOffload() : null;
        }
    }
    private ActivationOffload? _offload;
    /// <summary>
    /// Packed rows attend segment by segment (<see cref="LlamaAttention.SegmentedAttention"/>) instead of through a
    /// [B, 1, T, T] mask: callers that build batches (<see cref="MicroBatch.Create"/>) read this to make segments.
    /// </summary>
    public bool SegmentAttention { get; set; }
    /// <summary>
    /// Sequence-tiled MLP: tokens per tile of every layer's MLP (0: off), each tile checkpointed on its own so no
    /// [tokens, intermediate] tensor of the whole sequence exists (see <see cref="LlamaMlp.TileTokens"/>).
    /// </summary>
    public int MlpTileTokens
    {
        get => model.layers.Count == 0 ? 0 : model.layers[0].mlp.TileTokens;
        set
        {
            ArgumentOutOfRangeException.ThrowIfNegative(value);
            foreach (var l in model.layers) l.mlp.TileTokens = value;
        }
    }
    /// <summary>
    /// Token-tiled RMSNorms: tokens per tile of every norm over the hidden size (each layer's and the final one; 0: off),
    /// which then save their input and a float32 scale per token instead of a float32 copy of the input and compute
    /// their gradient tile by tile (see <see cref="RmsNorm.TileTokens"/>).
    /// </summary>
    public int NormTileTokens
    {
        get => model.norm.TileTokens;
        set
        {
            ArgumentOutOfRangeException.ThrowIfNegative(value);
            model.norm.TileTokens = value;
            foreach (var l in model.layers)
                foreach (var n in new[] { l.input_layernorm, l.post_attention_layernorm, l.pre_feedforward_layernorm, l.post_feedforward_layernorm })
                    if (n is not null) n.TileTokens = value;
        }
    }
    /// <summary>
    /// Grouped-query attention a K/V group at a time with no repeated K/V heads, recomputed per group in backward
    /// (<see cref="GroupedQueryAttention"/>); only models with fewer K/V heads than query heads are affected.
    /// </summary>
    public bool AttentionByGroup
    {
        get => model.layers.Count > 0 && model.layers[0].self_attn.AttentionByGroup;
        set
        {
            foreach (var l in model.layers) l.self_attn.AttentionByGroup = value;
        }
    }
    /// <summary>Tokens per chunk of the loss's logits (<see cref="DefaultLossChunkTokens"/> unless set).</summary>
    public int LossChunkTokens { get; set; } = DefaultLossChunkTokens;
    /// <summary>
    /// The default loss chunk. A chunk's backward holds about 12 bytes per token per vocabulary entry (fp32 log-softmax,
    /// its gradient and the logits' gradient): with 1024 tokens and Llama 3's 128,256 entries that is 1.6 GB, more than a
    /// decoder layer's recompute, so the memory planner showed the loss setting the peak of an 8B job; 256 tokens
    /// (0.4 GB) leaves the peak to the layers, and a 256-row matmul against the vocabulary is still large.
    /// </summary>
    public const int DefaultLossChunkTokens = 256;
    /// <summary>The adapted projections, by full HF module name.</summary>
    public IReadOnlyList<(string Name, LoraLinear Layer)> LoraLayers => _lora;
    /// <summary>
    /// The streamer the decoder layers' 4-bit weights come from (owned: disposed with the model), or null when they are
    /// held in memory.
    /// </summary>
    public LayerStreamer? Streamer { get; private set; }
    /// <summary>The device the model's tensors live on (that of the token embedding).</summary>
    public Device Device => model.norm.weight.device; // the compute device (the embedding table may stay on the host)
    /// <summary>
    /// Reseed the device's generator before every decoder layer in training, with a seed derived from one draw of the
    /// CPU generator per forward and the layer's index, so the layer's dropout masks are the same in its forward and
    /// in its checkpointed recompute without saving the generator's state (which TorchSharp cannot do for CUDA); the
    /// CPU generator, saved in training checkpoints, keeps the draws reproducible on resume. Null (default): on for
    /// CUDA, off on the CPU, where the checkpoint saves and restores the CPU generator's state instead.
    /// </summary>
    public bool? ReseedDropout { get; set; }

    /// <summary>
    /// Host memory tensors of the model read in place (the memory-mapped checkpoint behind a host embedding table),
    /// owned: released after the modules, since their tensors alias it.
    /// </summary>
    public IDisposable? HostMemory { get; set; }

    /// <summary>Releases the streamer (resident layers and the memory-mapped checkpoint) and the host memory with the modules.</summary>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            Streamer?.Dispose();
            Streamer = null;
            _offload?.Dispose();
            _offload = null;
        }
        base.Dispose(disposing);
        if (disposing)
        {
            HostMemory?.Dispose();
            HostMemory = null;
        }
    }

    /// <summary>
    /// Builds the model from dense weights by HF name (any float dtype); decoder projections are quantized to NF4 +
    /// double quant when <paramref name="quantize"/> (the QLoRA base), other tensors are kept in the compute dtype.
    /// </summary>
    public static LlamaForCausalLM FromWeights(LlamaConfig config, Func<string, Tensor?> weights, bool quantize = true,
        ScalarType computeDType = ScalarType.BFloat16, int blocksize = 64, Device? device = null) =>
        FromWeights(config, new TensorDictionaryWeights(weights), quantize, computeDType, blocksize, device: device);

    /// <summary>
    /// Builds the model tensor by tensor from <paramref name="weights"/>: each decoder projection becomes a
    /// <see cref="Linear4bit"/> (its stored 4-bit form, or quantized now when <paramref name="quantize"/>) or a frozen dense
    /// Linear (without <paramref name="quantize"/>: plain LoRA's 16-bit base, a stored 4-bit weight dequantized);
    /// embeddings, norms and lm_head stay dense in the compute dtype. A missing tensor or a shape that disagrees with
    /// the config is an <see cref="ArgumentException"/> naming the tensor.
    /// </summary>
    /// <remarks>
    /// With <paramref name="projections"/>, every decoder projection is a <see cref="Linear4bit"/> that factory builds
    /// (biases still come from <paramref name="weights"/>); a <see cref="LayerStreamer"/> factory becomes the model's
    /// <see cref="Streamer"/>, owned by the model. A projection whose module name <paramref name="keepDense"/> accepts
    /// (a bnb-4bit checkpoint's llm_int8_skip_modules) is a frozen dense Linear whatever the other arguments say. With
    /// <paramref name="hostEmbedding"/>, an untied model whose weights can be read in place (<see cref="IModelWeights.Mapped"/>)
    /// keeps its input embedding there (<see cref="FrozenEmbedding.OnHost"/>); the caller then hands the memory's owner to
    /// <see cref="HostMemory"/>.
    /// </remarks>
    public static LlamaForCausalLM FromWeights(LlamaConfig config, IModelWeights weights, bool quantize = true,
        ScalarType computeDType = ScalarType.BFloat16, int blocksize = 64, QuantType quantType = QuantType.Nf4, bool doubleQuant = true,
        IFourBitProjectionFactory? projections = null, Func<string, bool>? keepDense = null, bool hostEmbedding = false, Device? device = null)
    {
        // Each module is moved to the device as soon as it is built (its host copy freed), so host memory never holds
        // more than one tensor of a model that lives on a GPU.
        bool onDevice = device is not null && device.type != DeviceType.CPU;
        if (projections is LayerStreamer streaming && (streaming.Device.type != (device?.type ?? DeviceType.CPU) || (onDevice && streaming.Device.index != device!.index)))
            throw new ArgumentException($"the layer streamer copies to {streaming.Device}, the model is built on {device?.ToString() ?? "cpu"}: create the streamer for the model's device");
        T Place<T>(T module) where T : nn.Module => onDevice ? (T)module.to(device!) : module;
        void Check(string name, long[] shape)
        {
            if (!weights.Contains(name)) throw new ArgumentException($"missing weight {name}");
            var actual = weights.Shape(name);
            if (!actual.SequenceEqual(shape))
                throw new ArgumentException($"weight {name} has shape [{string.Join(", ", actual)}], the config implies [{string.Join(", ", shape)}]");
        }
        Tensor Get(string name, params long[] shape)
        {
            Check(name, shape);
            return weights.Dense(name);
        }
        Tensor? Bias(string name, bool present, long size) => present ? Get(name, size) : null;
        // A stored 4-bit weight wanted dense (no quantize: plain LoRA over a bnb-4bit folder): decoded as bitsandbytes
        // does, to quant_state.dtype and then the compute dtype.
        Tensor DenseOrDequantized(string name)
        {
            if (!weights.IsFourBit(name)) return weights.Dense(name);
            using var stored = new Linear4bit(weights.FourBit(name, quantType, blocksize, doubleQuant), null, computeDType);
            return stored.Dequantize(computeDType);
        }
        nn.Module<Tensor, Tensor> Proj(string name, long outF, long inF, bool bias)
        {
            bool dense = keepDense?.Invoke(name) == true;
            if (dense && weights.IsFourBit(name + ".weight"))
                throw new InvalidDataException($"{name} is kept dense by llm_int8_skip_modules but its weight is stored 4-bit");
            if (projections is not null && !dense)
            {
                using var pb = Bias(name + ".bias", bias, outF);
                return Place(projections.Create(name + ".weight", [outF, inF], pb, computeDType));
            }
            Check(name + ".weight", [outF, inF]);
            using var b = Bias(name + ".bias", bias, outF);
            if (quantize && !dense) return Place(new Linear4bit(weights.FourBit(name + ".weight", quantType, blocksize, doubleQuant), b, computeDType));
            using var w = DenseOrDequantized(name + ".weight");
            var lin = nn.Linear(inF, outF, hasBias: b is not null, dtype: computeDType);
            using (no_grad())
            {
                lin.weight!.copy_(w);
                if (b is not null) lin.bias!.copy_(b);
            }
            lin.weight!.requires_grad = false;
            if (lin.bias is not null) lin.bias.requires_grad = false;
            return Place(lin);
        }

        int hsz = config.HiddenSize, isz = config.IntermediateSize, hd = config.HeadDim;
        int q = config.NumAttentionHeads * hd, kv = config.NumKeyValueHeads * hd;
        var layers = new List<LlamaDecoderLayer>();
        long allocated = GC.GetTotalAllocatedBytes();
        for (int i = 0; i < config.NumHiddenLayers; i++)
        {
            ManagedHeap.ReturnFreeMemoryEvery(256L << 20, ref allocated); // the last layer's arrays are garbage now
            string p = $"model.layers.{i}.";
            bool ab = config.AttentionBias;
            nn.Module<Tensor, Tensor> qp = Proj(p + "self_attn.q_proj", q, hsz, ab), kp = Proj(p + "self_attn.k_proj", kv, hsz, ab),
                vp = Proj(p + "self_attn.v_proj", kv, hsz, ab), op = Proj(p + "self_attn.o_proj", hsz, q, ab && !config.QkvBiasOnly);
            var attn = config.QkNorm
                ? new LlamaAttention(config, qp, kp, vp, op, Norm(p + "self_attn.q_norm.weight", hd), Norm(p + "self_attn.k_norm.weight", hd))
                : new LlamaAttention(config, qp, kp, vp, op);
            var mlp = new LlamaMlp(Proj(p + "mlp.gate_proj", isz, hsz, config.MlpBias), Proj(p + "mlp.up_proj", isz, hsz, config.MlpBias),
                Proj(p + "mlp.down_proj", hsz, isz, config.MlpBias), geluTanh: config.Gemma is not null);
            layers.Add(config.Gemma is null
                ? new LlamaDecoderLayer(Norm(p + "input_layernorm.weight"), attn, Norm(p + "post_attention_layernorm.weight"), mlp)
                : new LlamaDecoderLayer(Norm(p + "input_layernorm.weight"), attn, Norm(p + "post_attention_layernorm.weight"),
                    Norm(p + "pre_feedforward_layernorm.weight"), mlp, Norm(p + "post_feedforward_layernorm.weight")));
        }
        RmsNorm Norm(string name, int? size = null)
        {
            var n = new RmsNorm(size ?? hsz, config.RmsNormEps, computeDType, unitOffset: config.Gemma is not null);
            using var w = Get(name, size ?? hsz);
            using (no_grad()) n.weight.copy_(w);
            return Place(n);
        }
        FrozenEmbedding embed;
        Check("model.embed_tokens.weight", [config.VocabSize, hsz]);
        // Only rows reach the device: a tied lm_head multiplies by the whole table, so it stays there.
        if (hostEmbedding && !config.TieWordEmbeddings && weights.Mapped("model.embed_tokens.weight") is { } mapped)
            embed = FrozenEmbedding.OnHost(mapped, computeDType);
        else
            using (var e = Get("model.embed_tokens.weight", config.VocabSize, hsz)) embed = Place(new FrozenEmbedding(e.to(computeDType)));
        var model = new LlamaModel(embed, layers, Norm("model.norm.weight"));
        nn.Module<Tensor, Tensor>? head = null;
        if (!config.TieWordEmbeddings && weights.IsFourBit("lm_head.weight") && quantize)
        {
            // A checkpoint quantized with lm_head (llm_int8_skip_modules without it): a frozen 4-bit head, as transformers loads it.
            Check("lm_head.weight", [config.VocabSize, hsz]);
            head = Place(new Linear4bit(weights.FourBit("lm_head.weight", quantType, blocksize, doubleQuant), null, computeDType));
        }
        else if (!config.TieWordEmbeddings)
        {
            // The loaded tensor becomes the weight: no second [vocab, hidden] buffer (and no random init) while loading.
            Check("lm_head.weight", [config.VocabSize, hsz]);
            using var w = DenseOrDequantized("lm_head.weight");
            head = Place(nn.Linear(new Parameter(w.to(computeDType).contiguous().detach(), requires_grad: false)));
        }
        return new LlamaForCausalLM(config, model, head, computeDType) { Streamer = projections as LayerStreamer };
    }

    /// <summary>
    /// A model with random weights (normal with std <paramref name="initStd"/>, transformers' default 0.02; norms 1),
    /// for tests and benchmarks.
    /// </summary>
    public static LlamaForCausalLM CreateRandom(LlamaConfig config, long seed, bool quantize = true, ScalarType computeDType = ScalarType.BFloat16,
        double initStd = 0.02, Device? device = null)
    {
        var gen = new Generator((ulong)seed);
        return FromWeights(config, name =>
        {
            int hsz = config.HiddenSize, hd = config.HeadDim;
            long[]? shape = null;
            if (name.EndsWith("q_norm.weight", StringComparison.Ordinal) || name.EndsWith("k_norm.weight", StringComparison.Ordinal)) return ones(hd);
            if (name.EndsWith("norm.weight", StringComparison.Ordinal)) return ones(hsz);
            if (name == "model.embed_tokens.weight" || name == "lm_head.weight") shape = [config.VocabSize, hsz];
            else if (name.EndsWith(".bias", StringComparison.Ordinal))
            {
                long outF = name.Contains("q_proj") ? config.NumAttentionHeads * hd : name.Contains("k_proj") || name.Contains("v_proj") ? config.NumKeyValueHeads * hd
                    : name.Contains("gate_proj") || name.Contains("up_proj") ? config.IntermediateSize : hsz;
                return randn([outF], generator: gen) * initStd;
            }
            else if (name.Contains("q_proj")) shape = [config.NumAttentionHeads * hd, hsz];
            else if (name.Contains("k_proj") || name.Contains("v_proj")) shape = [config.NumKeyValueHeads * hd, hsz];
            else if (name.Contains("o_proj")) shape = [hsz, config.NumAttentionHeads * hd];
            else if (name.Contains("gate_proj") || name.Contains("up_proj")) shape = [config.IntermediateSize, hsz];
            else if (name.Contains("down_proj")) shape = [hsz, config.IntermediateSize];
            return shape is null ? null : randn(shape, generator: gen) * initStd;
        }, quantize, computeDType, device: device);
    }

    /// <summary>
    /// Wraps the projections <paramref name="options"/> selects with <see cref="LoraLinear"/> adapters (PEFT's
    /// target_modules / layers_to_transform) and freezes everything else; returns the adapted module names.
    /// A second call adds another named adapter to the same projections.
    /// </summary>
    public IReadOnlyList<string> ApplyLora(LoraOptions options, Generator? generator = null)
    {
        options.Validate();
        var names = new List<string>();
        for (int i = 0; i < model.layers.Count; i++)
        {
            var layer = model.layers[i];
            foreach (var proj in new[] { "q_proj", "k_proj", "v_proj", "o_proj" })
                Wrap($"model.layers.{i}.self_attn.{proj}", layer.self_attn.Projection(proj), m => layer.self_attn.ReplaceProjection(proj, m));
            foreach (var proj in new[] { "gate_proj", "up_proj", "down_proj" })
                Wrap($"model.layers.{i}.mlp.{proj}", layer.mlp.Projection(proj), m => layer.mlp.ReplaceProjection(proj, m));
        }
        if (names.Count == 0) throw new ArgumentException("LoRA target modules matched no projection of the model");
        foreach (var (name, p) in named_parameters())
            p.requires_grad = name.Contains(".lora_A.", StringComparison.Ordinal) || name.Contains(".lora_B.", StringComparison.Ordinal)
                || name.Contains(".lora_magnitude_vector.", StringComparison.Ordinal);
        return names;

        void Wrap(string name, nn.Module<Tensor, Tensor> current, Action<nn.Module<Tensor, Tensor>> replace)
        {
            if (!options.IsTarget(name)) return;
            var own = options.ForModule(name); // rank_pattern / alpha_pattern
            if (current is LoraLinear existing)
            {
                existing.AddAdapter(own, generator);
            }
            else
            {
                var lora = new LoraLinear(current, own, generator);
                lora.train(training); // a new module starts in training mode; follow the model's
                replace(lora);
                _lora.Add((name, lora));
            }
            names.Add(name);
        }
    }

    /// <summary>Makes <paramref name="adapter"/> active on every adapted projection.</summary>
    public void SetAdapter(string adapter)
    {
        foreach (var (_, l) in _lora) l.SetAdapter(adapter);
    }

    /// <summary>Turns every adapter off (the base model) or on again.</summary>
    public void DisableAdapters(bool disabled)
    {
        foreach (var (_, l) in _lora) l.AdaptersDisabled = disabled;
    }

    /// <summary>The trainable (LoRA) parameters with their HF/PEFT names.</summary>
    public IReadOnlyList<(string Name, Parameter Parameter)> TrainableParameters() =>
        named_parameters().Where(p => p.parameter.requires_grad).Select(p => (p.name, p.parameter)).ToList();

    /// <summary>
    /// Optimizer groups: A matrices at <paramref name="learningRate"/>, B matrices at learningRate · <paramref name="loraPlusRatio"/>
    /// (LoRA+; 1 means plain LoRA, one rate for both). As PEFT's create_loraplus_optimizer, every 1-D parameter (DoRA's
    /// magnitude vectors) joins the B group.
    /// </summary>
    public IReadOnlyList<ParameterGroup> ParameterGroups(double learningRate, double loraPlusRatio = 1.0)
    {
        var all = TrainableParameters();
        static bool InB((string Name, Parameter Parameter) p) => p.Name.Contains(".lora_B.", StringComparison.Ordinal) || p.Parameter.dim() == 1;
        var a = all.Where(p => !InB(p)).ToList();
        var b = all.Where(InB).ToList();
        if (loraPlusRatio == 1.0) return [new ParameterGroup(all, learningRate) { Name = "lora" }];
        return [new ParameterGroup(a, learningRate) { Name = "lora_A" }, new ParameterGroup(b, learningRate * loraPlusRatio) { Name = "lora_B" }];
    }

    /// <summary>
    /// Final hidden states [B, T, H] for token ids [B, T]. <paramref name="positionIds"/> defaults to 0..T−1 per row;
    /// <paramref name="attentionMask"/> is null (causal) or a boolean [B, 1, T, T] "may attend" mask, e.g. block-diagonal
    /// causal for packed sequences.
    /// </summary>
    public Tensor Forward(Tensor inputIds, Tensor? positionIds = null, Tensor? attentionMask = null, IReadOnlyList<int[]>? segments = null)
    {
        using var scope = NewDisposeScope();
        long b = inputIds.shape[0], t = inputIds.shape[1];
        var pos = positionIds ?? arange(t, dtype: ScalarType.Int64, device: inputIds.device).unsqueeze(0).expand(b, t);
        var rope = _ropes.Select(r => r.CosSin(pos, ComputeDType)).ToArray();
        var masks = new Dictionary<int, Tensor?>();
        Tensor? MaskFor(int layer)
        {
            // A windowed layer (see LlamaConfig.SlidingWindowForLayer): causal and at most `window` positions back.
            if (Config.SlidingWindowForLayer(layer) is not int window || t <= window) return attentionMask;
            if (masks.TryGetValue(window, out var cached)) return cached;
            var i = arange(t, device: inputIds.device);
            var band = i.unsqueeze(1).ge(i.unsqueeze(0)).logical_and((i.unsqueeze(1) - i.unsqueeze(0)).lt(window)).view(1, 1, t, t);
            return masks[window] = attentionMask is null ? band : attentionMask.logical_and(band);
        }
        var h = ScaleEmbedding(model.embed_tokens.forward(inputIds));
        bool checkpoint = GradientCheckpointing && is_grad_enabled() && training;
        if (checkpoint)
        {
            var rows = h;
            h = rows.detach().requires_grad_(true); // the checkpoint node is only recorded when its input requires grad
            rows.Dispose(); // h shares its storage: one handle, so the first layer's input can be freed like the others
        }
        var streamer = Streamer;
        var offload = checkpoint ? _offload : null;
        offload?.StartStep();
        var device = inputIds.device;
        bool reseed = training && is_grad_enabled() && (ReseedDropout ?? device.type == DeviceType.CUDA);
        long draw = reseed ? DeviceRandom.DrawFromCpu() : 0;
        for (int index = 0; index < model.layers.Count; index++)
        {
            var l = model.layers[index];
            int i = index;
            long seed = reseed ? DeviceRandom.Derive(draw, i) : 0;
            var (cos, sin) = rope[_ropeOfLayer[index]];
            var mask = MaskFor(index);
            if (segments is not null && mask is not null)
                throw new NotSupportedException($"layer {index} attends within a sliding window shorter than the row, which segment attention does not apply; turn Training:SegmentAttention off for this model");
            if (checkpoint)
            {
                // Streaming: the first call is the forward (prefetch the next layer), the second the backward
                // recompute, which runs the layers in reverse (prefetch the previous one).
                int calls = 0;
                var input = h;
                h = Checkpoint.Run((x, c) =>
                {
                    streamer?.Acquire(i, calls++ == 0 ? i + 1 : i - 1);
                    if (reseed) DeviceRandom.ManualSeed(device, seed); // the same masks in forward and recompute
                    return l.Forward(x, c[0], c[1], c.Count > 2 ? c[2] : null, segments: segments);
                }, input, offload, preserveRngState: !reseed, mask is null ? [cos, sin] : [cos, sin, mask]);
                if (offload is not null) input.Dispose(); // its copy is on the host: free the device memory now
            }
            else
            {
                streamer?.Acquire(i, i + 1);
                if (reseed) DeviceRandom.ManualSeed(device, seed);
                using var input = h; // autograd keeps what it saved: the handle can go (evaluation keeps one layer's output, not all)
                h = l.Forward(input, cos, sin, mask, segments: segments);
            }
        }
        offload?.FinishStores();
        return model.norm.forward(h).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Inference step with a <see cref="KvCache"/>: hidden states [B, T, H] of <paramref name="inputIds"/> [B, T], which
    /// continue the cached tokens (positions start at the cache's length); their keys and values are appended.
    /// </summary>
    public Tensor Forward(Tensor inputIds, KvCache cache)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long b = inputIds.shape[0], t = inputIds.shape[1];
        for (int layer = 0; layer < Config.NumHiddenLayers; layer++)
            if (Config.SlidingWindowForLayer(layer) is int window && cache.Length + t > window)
                throw new NotSupportedException($"generation past the sliding window ({window} tokens, layer {layer}) is not supported");
        var pos = arange(cache.Length, cache.Length + t, dtype: ScalarType.Int64, device: inputIds.device).unsqueeze(0).expand(b, t);
        var rope = _ropes.Select(r => r.CosSin(pos, ComputeDType)).ToArray();
        var h = ScaleEmbedding(model.embed_tokens.forward(inputIds));
        for (int i = 0; i < model.layers.Count; i++)
        {
            Streamer?.Acquire(i, (i + 1) % model.layers.Count); // the next token starts again at layer 0
            var (cos, sin) = rope[_ropeOfLayer[i]];
            using var input = h;
            h = model.layers[i].Forward(input, cos, sin, null, cache, i);
        }
        return model.norm.forward(h).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Batched inference step over left-padded rows: hidden states [B, T, H] of <paramref name="inputIds"/> [B, T], which
    /// continue the cached tokens. Row b starts with <paramref name="leftPadding"/>[b] padding tokens (a [B] int64 tensor):
    /// its positions count from its first real token, and no query attends to its padding (a padding query attends to
    /// itself only, so its output stays finite and is never read).
    /// </summary>
    public Tensor Forward(Tensor inputIds, KvCache cache, Tensor leftPadding)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long b = inputIds.shape[0], t = inputIds.shape[1], past = cache.Length, s = past + t;
        var device = inputIds.device;
        var pad = leftPadding.to(ScalarType.Int64, device).view(b, 1);
        var query = arange(past, s, dtype: ScalarType.Int64, device: device);             // key index of each new token
        var pos = (query.unsqueeze(0) - pad).clamp_min(0);                                   // [B, T]
        var key = arange(s, dtype: ScalarType.Int64, device: device);
        var q = query.view(1, t, 1);
        var k = key.view(1, 1, s);
        var causal = k.le(q).logical_and(key.view(1, s).ge(pad).unsqueeze(1));              // [B, T, S]
        var self = k.eq(q);
        var rope = _ropes.Select(r => r.CosSin(pos, ComputeDType)).ToArray();
        var masks = new Dictionary<int, Tensor>();
        Tensor MaskFor(int layer)
        {
            int window = Config.SlidingWindowForLayer(layer) ?? 0;
            if (masks.TryGetValue(window, out var cached)) return cached;
            var allowed = window > 0 ? causal.logical_and((q - k).lt(window)) : causal;
            return masks[window] = allowed.logical_or(self).unsqueeze(1);                      // [B, 1, T, S]
        }
        var h = ScaleEmbedding(model.embed_tokens.forward(inputIds));
        for (int i = 0; i < model.layers.Count; i++)
        {
            Streamer?.Acquire(i, (i + 1) % model.layers.Count);
            var (cos, sin) = rope[_ropeOfLayer[i]];
            using var input = h;
            h = model.layers[i].Forward(input, cos, sin, MaskFor(i), cache, i);
        }
        return model.norm.forward(h).MoveToOuterDisposeScope();
    }

    /// <summary>Logits [.., vocab] in the compute dtype for hidden states (soft-capped when the model caps them: Gemma 2).</summary>
    public Tensor LmHead(Tensor hidden)
    {
        var logits = _lmHead is not null ? _lmHead.forward(hidden) : hidden.matmul(model.embed_tokens.weight.t());
        if (Config.Gemma?.FinalLogitSoftcapping is not double cap) return logits;
        using var scope = NewDisposeScope();
        var capped = (logits / cap).tanh() * cap;
        logits.Dispose();
        return capped.MoveToOuterDisposeScope();
    }

    // Gemma multiplies the embeddings by √hidden_size, a constant rounded to the activations' dtype first (as transformers does).
    private Tensor ScaleEmbedding(Tensor embedded) =>
        Config.Gemma is null ? embedded : embedded * tensor(Math.Sqrt(Config.HiddenSize), dtype: embedded.dtype, device: embedded.device);

    /// <summary>Logits [B, T, vocab] for token ids (inference and tests; training uses <see cref="Loss"/>).</summary>
    public Tensor Logits(Tensor inputIds, Tensor? positionIds = null, Tensor? attentionMask = null)
    {
        using var scope = NewDisposeScope();
        return LmHead(Forward(inputIds, positionIds, attentionMask)).MoveToOuterDisposeScope();
    }

    /// <summary>Summed fp32 cross-entropy over target tokens (labels −100 ignored, shifted by one) and their count.</summary>
    public (Tensor Sum, long Tokens) Loss(Tensor inputIds, Tensor labels, Tensor? positionIds = null, Tensor? attentionMask = null,
        IReadOnlyList<int[]>? segments = null)
    {
        using var scope = NewDisposeScope();
        var hidden = Forward(inputIds, positionIds, attentionMask, segments);
        var (sum, tokens) = CausalLmLoss.Compute(hidden, labels, LmHead, LossChunkTokens);
        return (sum.MoveToOuterDisposeScope(), tokens);
    }
}

/// <summary>The decoder stack (HF: <c>model</c>): embed_tokens, layers, norm.</summary>
public sealed class LlamaModel : nn.Module
{
    /// <summary>Assembles the stack.</summary>
    public LlamaModel(FrozenEmbedding embed, IEnumerable<LlamaDecoderLayer> layers, RmsNorm norm) : base("LlamaModel")
    {
        embed_tokens = embed;
        this.layers = new ModuleList<LlamaDecoderLayer>(layers.ToArray());
        this.norm = norm;
        register_module("embed_tokens", embed_tokens);
        register_module("layers", this.layers);
        register_module("norm", this.norm);
    }

    /// <summary>Token embeddings.</summary>
    public FrozenEmbedding embed_tokens { get; }
    /// <summary>Decoder layers.</summary>
    public ModuleList<LlamaDecoderLayer> layers { get; }
    /// <summary>Final norm.</summary>
    public RmsNorm norm { get; }
}
