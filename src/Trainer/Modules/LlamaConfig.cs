using System.Text.Json;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// The architecture of a Llama-family model (Llama 2/3, Mistral, Qwen2, Qwen3), read from a Hugging Face config.json with its
/// field names. Missing optional fields take the transformers defaults.
/// </summary>
public sealed record LlamaConfig
{
    /// <summary>hidden_size.</summary>
    public required int HiddenSize { get; init; }
    /// <summary>intermediate_size (the SwiGLU width).</summary>
    public required int IntermediateSize { get; init; }
    /// <summary>num_hidden_layers.</summary>
    public required int NumHiddenLayers { get; init; }
    /// <summary>num_attention_heads.</summary>
    public required int NumAttentionHeads { get; init; }
    /// <summary>num_key_value_heads (grouped-query attention); defaults to num_attention_heads.</summary>
    public required int NumKeyValueHeads { get; init; }
    /// <summary>vocab_size.</summary>
    public required int VocabSize { get; init; }
    /// <summary>head_dim; defaults to hidden_size / num_attention_heads.</summary>
    public required int HeadDim { get; init; }
    /// <summary>rms_norm_eps.</summary>
    public double RmsNormEps { get; init; } = 1e-6;
    /// <summary>rope_theta (transformers v4: top level; v5: inside rope_parameters).</summary>
    public double RopeTheta { get; init; } = 10000.0;
    /// <summary>rope_scaling (v4) or the scaling in rope_parameters (v5), or null for plain RoPE.</summary>
    public RopeScaling? RopeScaling { get; init; }
    /// <summary>
    /// RoPE per layer type (transformers v5's nested <c>rope_parameters</c>, keyed by the names in
    /// <see cref="LayerTypes"/>), or null when every layer uses <see cref="RopeTheta"/> and <see cref="RopeScaling"/>.
    /// </summary>
    public IReadOnlyDictionary<string, RopeParameters>? RopeByLayerType { get; init; }
    /// <summary>layer_types: each layer's attention kind (full_attention or sliding_attention), or null when all are full.</summary>
    public IReadOnlyList<string>? LayerTypes { get; init; }
    /// <summary>max_position_embeddings.</summary>
    public int MaxPositionEmbeddings { get; init; } = 2048;
    /// <summary>tie_word_embeddings: lm_head shares the embedding matrix.</summary>
    public bool TieWordEmbeddings { get; init; }
    /// <summary>attention_bias: q/k/v/o projections have biases (Qwen2 sets q/k/v biases; see <see cref="QkvBiasOnly"/>).</summary>
    public bool AttentionBias { get; init; }
    /// <summary>Only q/k/v carry biases (Qwen2's layout), not o_proj.</summary>
    public bool QkvBiasOnly { get; init; }
    /// <summary>mlp_bias: gate/up/down projections have biases.</summary>
    public bool MlpBias { get; init; }
    /// <summary>
    /// sliding_window: a windowed layer's token attends to at most this many positions (itself included), or null for
    /// none. Which layers are windowed is <see cref="SlidingWindowForLayer"/>'s decision.
    /// </summary>
    public int? SlidingWindow { get; init; }
    /// <summary>
    /// Qwen3's q_norm / k_norm: an RMSNorm over head_dim (weights <c>self_attn.q_norm.weight</c>, <c>self_attn.k_norm.weight</c>)
    /// applied to every query and key head before RoPE.
    /// </summary>
    public bool QkNorm { get; init; }
    /// <summary>
    /// Gemma 2 / Gemma 3's departures from Llama (embedding scaling, (1 + weight) norms, GeGLU, sandwich norms, query
    /// scaling, soft-capping), or null for the Llama family.
    /// </summary>
    public GemmaFeatures? Gemma { get; init; }
    /// <summary>The architectures entry (e.g. LlamaForCausalLM).</summary>
    public string Architecture { get; init; } = "LlamaForCausalLM";

    /// <summary>Architectures this project runs.</summary>
    public static readonly IReadOnlyList<string> SupportedArchitectures = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"];

    /// <summary>
    /// The window of layer <paramref name="layer"/>, or null when it attends to every earlier position: the one place that
    /// decides it. With <see cref="LayerTypes"/>, only sliding_attention layers are windowed (Qwen2 from
    /// max_window_layers on, or as layer_types says); without, every layer has <see cref="SlidingWindow"/> (Mistral).
    /// </summary>
    public int? SlidingWindowForLayer(int layer) =>
        SlidingWindow is int w && (LayerTypes is null || LayerTypes[layer] == SlidingAttention) ? w : null;

    /// <summary>The RoPE of layer <paramref name="layer"/>: its layer type's when the config has one per type.</summary>
    public RopeParameters RopeForLayer(int layer) =>
        RopeByLayerType is { } byType && LayerTypes is { } types ? byType[types[layer]] : new RopeParameters(RopeTheta, RopeScaling);

    /// <summary>The layer_types name of a layer with full causal attention.</summary>
    public const string FullAttention = "full_attention";
    /// <summary>The layer_types name of a layer with sliding-window attention.</summary>
    public const string SlidingAttention = "sliding_attention";

    /// <summary>Reads config.json; throws <see cref="FormatException"/> naming the file and the field for anything missing or invalid.</summary>
    public static LlamaConfig Load(string path)
    {
        JsonObject obj;
        try { obj = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new FormatException("not a JSON object"); }
        catch (JsonException e) { throw new FormatException($"{path}: not valid JSON ({e.Message})"); }
        try { return FromJson(obj); }
        catch (FormatException e) { throw new FormatException($"{path}: {e.Message}", e); }
    }

    /// <summary>Reads the fields from a parsed config.json object.</summary>
    public static LlamaConfig FromJson(JsonObject c)
    {
        string arch = c["architectures"] is JsonArray a && a.Count > 0 ? a[0]!.GetValue<string>() : "LlamaForCausalLM";
        if (arch == "Gemma3ForConditionalGeneration")
            throw new FormatException("architecture Gemma3ForConditionalGeneration (Gemma 3 with its vision tower, the 4B/12B/27B checkpoints) is not supported; the text-only Gemma3ForCausalLM layout is");
        if (!SupportedArchitectures.Contains(arch))
            throw new FormatException($"architecture {arch} is not supported; supported: {string.Join(", ", SupportedArchitectures)}");
        if (GemmaFeatures.IsGemma(arch))
            return GemmaFeatures.ReadConfig(c, arch);
        int hidden = Int(c, "hidden_size");
        int heads = Int(c, "num_attention_heads");
        int layers = Int(c, "num_hidden_layers");
        bool qwen = arch == "Qwen2ForCausalLM", mistral = arch == "MistralForCausalLM";
        bool qwen3 = arch == "Qwen3ForCausalLM";
        int maxPositions = c["max_position_embeddings"] is null ? 2048 : Int(c, "max_position_embeddings");
        // Sliding windows as transformers decides them. Mistral: sliding_window, 4096 when the key is absent (an explicit
        // null means none), on every layer. Qwen2: only with use_sliding_window (sliding_window defaulting to 4096), on
        // the layers layer_types marks sliding_attention, by default those from max_window_layers (28) on. Llama: none.
        int? window = null;
        IReadOnlyList<string>? layerTypes = null;
        if (mistral) window = c.ContainsKey("sliding_window") ? OptionalInt(c, "sliding_window") : 4096;
        if (qwen || qwen3) // Qwen3Config decides windows as Qwen2Config does
        {
            window = Bool(c, "use_sliding_window", false) ? (c.ContainsKey("sliding_window") ? OptionalInt(c, "sliding_window") : 4096) : null;
            int maxWindowLayers = c["max_window_layers"] is null ? 28 : Int(c, "max_window_layers");
            layerTypes = Enumerable.Range(0, layers).Select(i => window is not null && i >= maxWindowLayers ? SlidingAttention : FullAttention).ToList();
        }
        if (!mistral && c["layer_types"] is JsonNode lt) layerTypes = LayerTypeList(lt, layers);
        var rope = RopeParameters.Read(c, maxPositions, layerTypes);
        var cfg = new LlamaConfig
        {
            Architecture = arch,
            HiddenSize = hidden,
            IntermediateSize = Int(c, "intermediate_size"),
            NumHiddenLayers = layers,
            NumAttentionHeads = heads,
            NumKeyValueHeads = c["num_key_value_heads"] is null ? heads : Int(c, "num_key_value_heads"),
            VocabSize = Int(c, "vocab_size"),
            HeadDim = c["head_dim"] is null ? hidden / heads : Int(c, "head_dim"),
            RmsNormEps = Double(c, "rms_norm_eps", 1e-6),
            RopeTheta = rope.Global.Theta,
            RopeScaling = rope.Global.Scaling,
            RopeByLayerType = rope.ByLayerType,
            LayerTypes = layerTypes,
            MaxPositionEmbeddings = maxPositions,
            TieWordEmbeddings = Bool(c, "tie_word_embeddings", false),
            AttentionBias = qwen || Bool(c, "attention_bias", false),
            QkvBiasOnly = qwen,
            MlpBias = Bool(c, "mlp_bias", false),
            QkNorm = qwen3,
            SlidingWindow = window,
        };
        cfg.Validate();
        return cfg;
    }

    /// <summary>Checks the shapes are consistent; throws <see cref="FormatException"/> naming the field.</summary>
    public void Validate()
    {
        foreach (var (name, v) in new[] { ("hidden_size", HiddenSize), ("intermediate_size", IntermediateSize), ("num_hidden_layers", NumHiddenLayers),
                     ("num_attention_heads", NumAttentionHeads), ("num_key_value_heads", NumKeyValueHeads), ("vocab_size", VocabSize), ("head_dim", HeadDim) })
            if (v <= 0) throw new FormatException($"{name} = {v}: must be positive");
        if (NumAttentionHeads % NumKeyValueHeads != 0)
            throw new FormatException($"num_attention_heads {NumAttentionHeads} is not a multiple of num_key_value_heads {NumKeyValueHeads}");
        if (HeadDim % 2 != 0) throw new FormatException($"head_dim {HeadDim} must be even for rotary embeddings");
        if (SlidingWindow is <= 0) throw new FormatException($"sliding_window = {SlidingWindow}: must be positive");
        if (LayerTypes is not null && LayerTypes.Count != NumHiddenLayers)
            throw new FormatException($"layer_types has {LayerTypes.Count} entries, num_hidden_layers is {NumHiddenLayers}");
        if (RopeByLayerType is not null && LayerTypes?.FirstOrDefault(t => !RopeByLayerType.ContainsKey(t)) is { } missing)
            throw new FormatException($"rope_parameters has no entry for layer type {missing}");
    }

    internal static int Int(JsonObject c, string name)
    {
        if (c[name] is not JsonValue v) throw new FormatException($"missing field {name}");
        try { return v.GetValue<int>(); }
        catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new FormatException($"field {name} = {v.ToJsonString()} is not an integer"); }
    }

    internal static int? OptionalInt(JsonObject c, string name) => c[name] is null ? null : Int(c, name);

    internal static List<string> LayerTypeList(JsonNode node, int layers)
    {
        if (node is not JsonArray a || a.Any(n => n is not JsonValue v || !v.TryGetValue<string>(out _)))
            throw new FormatException($"field layer_types = {node.ToJsonString()} is not a list of strings");
        var types = a.Select(n => n!.GetValue<string>()).ToList();
        if (types.FirstOrDefault(t => t is not (FullAttention or SlidingAttention)) is { } other)
            throw new FormatException($"layer_types entry '{other}' is not supported ({FullAttention}, {SlidingAttention})");
        if (types.Count != layers) throw new FormatException($"layer_types has {types.Count} entries, num_hidden_layers is {layers}");
        return types;
    }

    internal static double Double(JsonObject c, string name, double fallback)
    {
        if (c[name] is null) return fallback;
        try { return c[name]!.GetValue<double>(); }
        catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new FormatException($"field {name} = {c[name]!.ToJsonString()} is not a number"); }
    }

    internal static bool Bool(JsonObject c, string name, bool fallback)
    {
        if (c[name] is null) return fallback;
        try { return c[name]!.GetValue<bool>(); }
        catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new FormatException($"field {name} = {c[name]!.ToJsonString()} is not true/false"); }
    }
}
