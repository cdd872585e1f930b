using System.Text.Json.Nodes;
using QLora.Trainer;

namespace QLora.Trainer.Tests;

/// <summary>Tiny configurations the tests build models from.</summary>
internal static class TinyLlama
{
    public static LlamaConfig Config(int layers = 2, int hidden = 32, int heads = 4, int kvHeads = 2, int vocab = 64, int inter = 64,
        bool tied = false, bool qwen = false, RopeScaling? rope = null) => new()
    {
        HiddenSize = hidden, IntermediateSize = inter, NumHiddenLayers = layers, NumAttentionHeads = heads,
        NumKeyValueHeads = kvHeads, VocabSize = vocab, HeadDim = hidden / heads, RmsNormEps = 1e-5, RopeTheta = 10000,
        TieWordEmbeddings = tied, AttentionBias = qwen, QkvBiasOnly = qwen, RopeScaling = rope,
        Architecture = qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM",
    };
}
