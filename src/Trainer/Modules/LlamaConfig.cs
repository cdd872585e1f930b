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
    /// <summary>rope_theta.</summary>
    public double RopeTheta { get; init; } = 10000.0;
    /// <summary>rope_scaling, or null.</summary>
    public RopeScaling? RopeScaling { get; init; }
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
    /// <summary>sliding_window (Mistral v0.1: each token attends to at most this many positions), or null.</summary>
    public int? SlidingWindow { get; init; }
    /// <summary>
    /// Qwen3's q_norm / k_norm: an RMSNorm over head_dim (weights <c>self_attn.q_norm.weight</c>, <c>self_attn.k_norm.weight</c>)
    /// applied to every query and key head before RoPE.
    /// </summary>
    public bool QkNorm { get; init; }
    /// <summary>The architectures entry (e.g. LlamaForCausalLM).</summary>
    public string Architecture { get; init; } = "LlamaForCausalLM";

    /// <summary>Architectures this project runs.</summary>
    public static readonly IReadOnlyList<string> SupportedArchitectures = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"];

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
        if (!SupportedArchitectures.Contains(arch))
            throw new FormatException($"architecture {arch} is not supported; supported: {string.Join(", ", SupportedArchitectures)}");
        int hidden = Int(c, "hidden_size");
        int heads = Int(c, "num_attention_heads");
        bool qwen = arch == "Qwen2ForCausalLM";
        bool qwen3 = arch == "Qwen3ForCausalLM";
        var cfg = new LlamaConfig
        {
            Architecture = arch,
            HiddenSize = hidden,
            IntermediateSize = Int(c, "intermediate_size"),
            NumHiddenLayers = Int(c, "num_hidden_layers"),
            NumAttentionHeads = heads,
            NumKeyValueHeads = c["num_key_value_heads"] is null ? heads : Int(c, "num_key_value_heads"),
            VocabSize = Int(c, "vocab_size"),
            HeadDim = c["head_dim"] is null ? hidden / heads : Int(c, "head_dim"),
            RmsNormEps = Double(c, "rms_norm_eps", 1e-6),
            RopeTheta = Double(c, "rope_theta", 10000.0),
            RopeScaling = c["rope_scaling"] is JsonObject rs ? Trainer.RopeScaling.FromJson(rs) : null,
            MaxPositionEmbeddings = c["max_position_embeddings"] is null ? 2048 : Int(c, "max_position_embeddings"),
            TieWordEmbeddings = Bool(c, "tie_word_embeddings", false),
            AttentionBias = qwen || Bool(c, "attention_bias", false),
            QkvBiasOnly = qwen,
            MlpBias = Bool(c, "mlp_bias", false),
            QkNorm = qwen3,
            // Qwen2 and Qwen3 configs carry sliding_window but only apply it with use_sliding_window.
            SlidingWindow = c["sliding_window"] is JsonValue && (!(qwen || qwen3) || Bool(c, "use_sliding_window", false)) ? Int(c, "sliding_window") : null,
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
    }

    private static int Int(JsonObject c, string name)
    {
        if (c[name] is not JsonValue v) throw new FormatException($"missing field {name}");
        try { return v.GetValue<int>(); }
        catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new FormatException($"field {name} = {v.ToJsonString()} is not an integer"); }
    }

    private static double Double(JsonObject c, string name, double fallback)
    {
        if (c[name] is null) return fallback;
        try { return c[name]!.GetValue<double>(); }
        catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new FormatException($"field {name} = {c[name]!.ToJsonString()} is not a number"); }
    }

    private static bool Bool(JsonObject c, string name, bool fallback)
    {
        if (c[name] is null) return fallback;
        try { return c[name]!.GetValue<bool>(); }
        catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new FormatException($"field {name} = {c[name]!.ToJsonString()} is not true/false"); }
    }
}

/// <summary>rope_scaling: "llama3" (Llama 3.1+: per-frequency scaling between low and high wavelength bounds) or "linear".</summary>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor = 1, double HighFreqFactor = 4, int OriginalMaxPositionEmbeddings = 8192)
{
    /// <summary>Reads the block; throws <see cref="FormatException"/> for an unknown type.</summary>
    public static RopeScaling FromJson(JsonObject o)
    {
        string type = (o["rope_type"] ?? o["type"])?.GetValue<string>() ?? throw new FormatException("rope_scaling has no rope_type");
        if (type is not ("llama3" or "linear" or "default"))
            throw new FormatException($"rope_scaling type '{type}' is not supported (llama3, linear)");
        double factor = o["factor"]?.GetValue<double>() ?? 1.0;
        return new RopeScaling(type, factor,
            o["low_freq_factor"]?.GetValue<double>() ?? 1,
            o["high_freq_factor"]?.GetValue<double>() ?? 4,
            o["original_max_position_embeddings"]?.GetValue<int>() ?? 8192);
    }
}
