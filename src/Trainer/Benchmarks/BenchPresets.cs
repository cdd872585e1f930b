namespace QLora.Trainer;

/// <summary>
/// Architectures of well-known models, with the shapes of their Hugging Face config.json, for the memory benchmark.
/// (The memory planner keeps a table with the same names; the two are to be unified.)
/// </summary>
public static class BenchPresets
{
    private static readonly RopeScaling Llama31Rope = new("llama3", 8.0, 1.0, 4.0, 8192);

    private static readonly (string Name, LlamaConfig Config)[] Table =
    [
        ("llama-2-7b", new LlamaConfig
        {
            HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32, NumAttentionHeads = 32, NumKeyValueHeads = 32,
            VocabSize = 32000, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 10000, MaxPositionEmbeddings = 4096,
        }),
        ("llama-3.1-8b", new LlamaConfig
        {
            HiddenSize = 4096, IntermediateSize = 14336, NumHiddenLayers = 32, NumAttentionHeads = 32, NumKeyValueHeads = 8,
            VocabSize = 128256, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 500000, RopeScaling = Llama31Rope, MaxPositionEmbeddings = 131072,
        }),
        ("llama-2-13b", new LlamaConfig
        {
            HiddenSize = 5120, IntermediateSize = 13824, NumHiddenLayers = 40, NumAttentionHeads = 40, NumKeyValueHeads = 40,
            VocabSize = 32000, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 10000, MaxPositionEmbeddings = 4096,
        }),
        ("qwen2.5-32b", new LlamaConfig
        {
            Architecture = "Qwen2ForCausalLM", HiddenSize = 5120, IntermediateSize = 27648, NumHiddenLayers = 64, NumAttentionHeads = 40,
            NumKeyValueHeads = 8, VocabSize = 152064, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 1000000, MaxPositionEmbeddings = 32768,
            AttentionBias = true, QkvBiasOnly = true,
        }),
        ("llama-3.1-70b", new LlamaConfig
        {
            HiddenSize = 8192, IntermediateSize = 28672, NumHiddenLayers = 80, NumAttentionHeads = 64, NumKeyValueHeads = 8,
            VocabSize = 128256, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 500000, RopeScaling = Llama31Rope, MaxPositionEmbeddings = 131072,
        }),
    ];

    /// <summary>The preset names, in table order.</summary>
    public static IReadOnlyList<string> Names { get; } = Table.Select(t => t.Name).ToArray();

    /// <summary>The architecture of preset <paramref name="name"/>; an unknown name is an <see cref="ArgumentException"/> listing the valid ones.</summary>
    public static LlamaConfig Get(string name)
    {
        foreach (var (n, c) in Table)
            if (string.Equals(n, name, StringComparison.OrdinalIgnoreCase)) return c;
        throw new ArgumentException($"unknown preset '{name}'; valid presets: {string.Join(", ", Names)}");
    }
}
