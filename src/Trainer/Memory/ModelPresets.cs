using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// Architectures of well-known models by short name, with the shapes of their Hugging Face config.json files, so a
/// memory plan needs no download.
/// </summary>
public static class ModelPresets
{
    private static readonly RopeScaling Llama31Rope = new("llama3", 8.0, 1.0, 4.0, 8192);

    private static readonly Dictionary<string, LlamaConfig> Presets = new(StringComparer.OrdinalIgnoreCase)
    {
        // meta-llama/Llama-2-7b-hf
        ["llama-2-7b"] = new LlamaConfig
        {
            HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32, NumAttentionHeads = 32, NumKeyValueHeads = 32,
            VocabSize = 32000, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 10000, MaxPositionEmbeddings = 4096,
        },
        // meta-llama/Llama-3.1-8B
        ["llama-3.1-8b"] = new LlamaConfig
        {
            HiddenSize = 4096, IntermediateSize = 14336, NumHiddenLayers = 32, NumAttentionHeads = 32, NumKeyValueHeads = 8,
            VocabSize = 128256, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 500000, RopeScaling = Llama31Rope, MaxPositionEmbeddings = 131072,
        },
        // meta-llama/Llama-2-13b-hf
        ["llama-2-13b"] = new LlamaConfig
        {
            HiddenSize = 5120, IntermediateSize = 13824, NumHiddenLayers = 40, NumAttentionHeads = 40, NumKeyValueHeads = 40,
            VocabSize = 32000, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 10000, MaxPositionEmbeddings = 4096,
        },
        // Qwen/Qwen2.5-32B: q/k/v biases, untied embeddings
        ["qwen2.5-32b"] = new LlamaConfig
        {
            Architecture = "Qwen2ForCausalLM", HiddenSize = 5120, IntermediateSize = 27648, NumHiddenLayers = 64, NumAttentionHeads = 40,
            NumKeyValueHeads = 8, VocabSize = 152064, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 1000000, MaxPositionEmbeddings = 131072,
            AttentionBias = true, QkvBiasOnly = true, TieWordEmbeddings = false,
        },
        // meta-llama/Llama-3.1-70B
        ["llama-3.1-70b"] = new LlamaConfig
        {
            HiddenSize = 8192, IntermediateSize = 28672, NumHiddenLayers = 80, NumAttentionHeads = 64, NumKeyValueHeads = 8,
            VocabSize = 128256, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 500000, RopeScaling = Llama31Rope, MaxPositionEmbeddings = 131072,
        },
        // Qwen/Qwen3-8B: q_norm/k_norm on the heads, no biases, untied embeddings
        ["qwen3-8b"] = new LlamaConfig
        {
            Architecture = "Qwen3ForCausalLM", HiddenSize = 4096, IntermediateSize = 12288, NumHiddenLayers = 36, NumAttentionHeads = 32,
            NumKeyValueHeads = 8, VocabSize = 151936, HeadDim = 128, RmsNormEps = 1e-6, RopeTheta = 1000000, MaxPositionEmbeddings = 40960,
            QkNorm = true, TieWordEmbeddings = false,
        },
        // google/gemma-2-9b: GeGLU, sandwich norms, soft-capping (attention 50, logits 30), every other layer a 4096 window
        ["gemma-2-9b"] = LlamaConfig.FromJson(new JsonObject
        {
            ["architectures"] = new JsonArray("Gemma2ForCausalLM"), ["hidden_size"] = 3584, ["intermediate_size"] = 14336, ["num_hidden_layers"] = 42,
            ["num_attention_heads"] = 16, ["num_key_value_heads"] = 8, ["head_dim"] = 256, ["vocab_size"] = 256000, ["rms_norm_eps"] = 1e-6,
            ["rope_theta"] = 10000.0, ["max_position_embeddings"] = 8192, ["sliding_window"] = 4096, ["query_pre_attn_scalar"] = 256.0,
            ["attn_logit_softcapping"] = 50.0, ["final_logit_softcapping"] = 30.0,
        }),
        // google/gemma-3-12b-pt's text model (its text_config): q/k norms, 1024-token windows on 5 of every 6 layers, local RoPE base 10000
        ["gemma-3-12b"] = LlamaConfig.FromJson(new JsonObject
        {
            ["architectures"] = new JsonArray("Gemma3ForCausalLM"), ["hidden_size"] = 3840, ["intermediate_size"] = 15360, ["num_hidden_layers"] = 48,
            ["num_attention_heads"] = 16, ["num_key_value_heads"] = 8, ["head_dim"] = 256, ["vocab_size"] = 262208, ["rms_norm_eps"] = 1e-6,
            ["rope_theta"] = 1000000.0, ["rope_local_base_freq"] = 10000.0, ["rope_scaling"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = 8.0 },
            ["max_position_embeddings"] = 131072, ["sliding_window"] = 1024, ["sliding_window_pattern"] = 6, ["query_pre_attn_scalar"] = 256.0,
        }),
    };

    /// <summary>The preset names.</summary>
    public static IReadOnlyList<string> Names { get; } = Presets.Keys.ToList();

    /// <summary>The architecture of a preset, or false for an unknown name (case-insensitive).</summary>
    public static bool TryGet(string name, out LlamaConfig config)
    {
        if (Presets.TryGetValue(name, out var c)) { config = c; return true; }
        config = null!;
        return false;
    }

    /// <summary>The architecture of preset <paramref name="name"/>; an unknown name is an <see cref="ArgumentException"/> listing the valid ones.</summary>
    public static LlamaConfig Get(string name) =>
        TryGet(name, out var c) ? c : throw new ArgumentException($"unknown preset '{name}'; valid presets: {string.Join(", ", Names)}");

    /// <summary>
    /// The architecture behind <paramref name="model"/>: a model folder holding config.json, a config.json file, or a
    /// preset name; anything else is an <see cref="ArgumentException"/> that lists the presets.
    /// </summary>
    public static LlamaConfig Resolve(string model)
    {
        if (Directory.Exists(model))
        {
            var path = Path.Combine(model, "config.json");
            if (!File.Exists(path)) throw new FileNotFoundException($"{model}: the folder has no config.json");
            return LlamaConfig.Load(path);
        }
        if (File.Exists(model)) return LlamaConfig.Load(model);
        if (TryGet(model, out var preset)) return preset;
        throw new ArgumentException($"'{model}' is neither a model folder, a config.json nor a preset; presets: {string.Join(", ", Names)}");
    }
}
