using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// What Gemma 2 and Gemma 3 text models do differently from Llama, as transformers' modeling_gemma2 / modeling_gemma3
/// compute it: the embeddings are multiplied by √hidden_size (rounded to the activations' dtype); every RMSNorm scales by
/// (1 + weight), all in float32; the MLP is GeGLU with tanh-approximated GELU; each layer norms the attention and MLP
/// outputs too (post_attention_layernorm, pre_/post_feedforward_layernorm); queries are scaled by
/// query_pre_attn_scalar^-½ instead of head_dim^-½; attention scores and final logits may be soft-capped
/// (cap · tanh(x / cap)). Sliding-window layers and Gemma 3's second RoPE base go through
/// <see cref="LlamaConfig.LayerTypes"/> and <see cref="LlamaConfig.RopeForLayer"/>; Gemma 3's q_norm / k_norm through
/// <see cref="LlamaConfig.QkNorm"/>.
/// </summary>
/// <param name="QueryPreAttnScalar">query_pre_attn_scalar: attention scores are q·k / √(this).</param>
/// <param name="AttnLogitSoftcapping">attn_logit_softcapping (Gemma 2: 50), or null.</param>
/// <param name="FinalLogitSoftcapping">final_logit_softcapping (Gemma 2: 30), or null.</param>
public sealed record GemmaFeatures(double QueryPreAttnScalar, double? AttnLogitSoftcapping, double? FinalLogitSoftcapping)
{
    /// <summary>Whether <paramref name="architecture"/> is a Gemma text model this project runs.</summary>
    public static bool IsGemma(string architecture) => architecture is "Gemma2ForCausalLM" or "Gemma3ForCausalLM";

    /// <summary>
    /// Reads a Gemma2ForCausalLM or Gemma3ForCausalLM config.json with Gemma2Config's / Gemma3TextConfig's defaults;
    /// throws <see cref="FormatException"/> naming a field it does not implement.
    /// </summary>
    internal static LlamaConfig ReadConfig(JsonObject c, string arch)
    {
        bool gemma3 = arch == "Gemma3ForCausalLM";
        int hidden = LlamaConfig.Int(c, "hidden_size");
        int heads = LlamaConfig.Int(c, "num_attention_heads");
        int layers = LlamaConfig.Int(c, "num_hidden_layers");
        string activation = c["hidden_activation"] is JsonValue act ? act.GetValue<string>() : "gelu_pytorch_tanh";
        if (activation != "gelu_pytorch_tanh")
            throw new FormatException($"hidden_activation '{activation}' is not supported for {arch} (gelu_pytorch_tanh)");
        if (LlamaConfig.Bool(c, "attention_bias", false))
            throw new FormatException($"attention_bias true is not supported for {arch}");
        int maxPositions = c["max_position_embeddings"] is null ? (gemma3 ? 131072 : 8192) : LlamaConfig.Int(c, "max_position_embeddings");
        int? window = c.ContainsKey("sliding_window") ? LlamaConfig.OptionalInt(c, "sliding_window") : 4096;

        // Which layers slide: layer_types when given; else Gemma 2 alternates (even layers slide), Gemma 3 slides all but
        // every sliding_window_pattern-th layer (default 6).
        IReadOnlyList<string> layerTypes;
        if (c["layer_types"] is JsonNode lt)
        {
            layerTypes = LlamaConfig.LayerTypeList(lt, layers);
        }
        else
        {
            int pattern = gemma3 ? (c["sliding_window_pattern"] is null ? 6 : LlamaConfig.Int(c, "sliding_window_pattern")) : 2;
            layerTypes = Enumerable.Range(0, layers).Select(i => (i + 1) % pattern != 0 ? LlamaConfig.SlidingAttention : LlamaConfig.FullAttention).ToList();
        }

        // RoPE: transformers v5 gives one block per layer type; v4 Gemma 3 gives rope_theta (+ rope_scaling) for global
        // layers and rope_local_base_freq, unscaled, for sliding ones.
        var withDefaultTheta = (JsonObject)c.DeepClone();
        if (withDefaultTheta["rope_theta"] is null) withDefaultTheta["rope_theta"] = gemma3 ? 1_000_000.0 : 10_000.0;
        var rope = RopeParameters.Read(withDefaultTheta, maxPositions, layerTypes);
        var byType = rope.ByLayerType;
        if (gemma3 && byType is null)
        {
            var local = new RopeParameters(LlamaConfig.Double(c, "rope_local_base_freq", 10_000.0), null);
            byType = new Dictionary<string, RopeParameters>(StringComparer.Ordinal)
            {
                [LlamaConfig.FullAttention] = rope.Global,
                [LlamaConfig.SlidingAttention] = local,
            };
        }
        double? Cap(string name, double? fallback) => c.ContainsKey(name) ? (c[name] is null ? null : LlamaConfig.Double(c, name, 0)) : fallback;
        var cfg = new LlamaConfig
        {
            Architecture = arch,
            HiddenSize = hidden,
            IntermediateSize = LlamaConfig.Int(c, "intermediate_size"),
            NumHiddenLayers = layers,
            NumAttentionHeads = heads,
            NumKeyValueHeads = c["num_key_value_heads"] is null ? heads : LlamaConfig.Int(c, "num_key_value_heads"),
            VocabSize = LlamaConfig.Int(c, "vocab_size"),
            HeadDim = c["head_dim"] is null ? 256 : LlamaConfig.Int(c, "head_dim"),
            RmsNormEps = LlamaConfig.Double(c, "rms_norm_eps", 1e-6),
            RopeTheta = rope.Global.Theta,
            RopeScaling = rope.Global.Scaling,
            RopeByLayerType = byType,
            LayerTypes = layerTypes,
            MaxPositionEmbeddings = maxPositions,
            TieWordEmbeddings = LlamaConfig.Bool(c, "tie_word_embeddings", true),
            SlidingWindow = window,
            QkNorm = gemma3,
            Gemma = new GemmaFeatures(
                LlamaConfig.Double(c, "query_pre_attn_scalar", 256),
                Cap("attn_logit_softcapping", gemma3 ? null : 50.0),
                Cap("final_logit_softcapping", gemma3 ? null : 30.0)),
        };
        cfg.Validate();
        return cfg;
    }
}
