using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>One pre-norm decoder layer: h + attn(norm(h)), then + mlp(norm(·)). HF names: input_layernorm, self_attn, post_attention_layernorm, mlp.</summary>
public sealed class LlamaDecoderLayer : nn.Module
{
    /// <summary>Assembles a layer.</summary>
    public LlamaDecoderLayer(RmsNorm inputNorm, LlamaAttention attention, RmsNorm postNorm, LlamaMlp mlp) : base("LlamaDecoderLayer")
    {
        input_layernorm = inputNorm;
        self_attn = attention;
        post_attention_layernorm = postNorm;
        this.mlp = mlp;
        register_module("input_layernorm", input_layernorm);
        register_module("self_attn", self_attn);
        register_module("post_attention_layernorm", post_attention_layernorm);
        register_module("mlp", this.mlp);
    }

    /// <summary>Norm before attention.</summary>
    public RmsNorm input_layernorm { get; }
    /// <summary>Self-attention.</summary>
    public LlamaAttention self_attn { get; }
    /// <summary>Norm before the MLP.</summary>
    public RmsNorm post_attention_layernorm { get; }
    /// <summary>Feed-forward.</summary>
    public LlamaMlp mlp { get; }

    /// <summary>The layer's output for hidden states [B, T, H].</summary>
    public Tensor Forward(Tensor hidden, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache = null, int layer = 0, IReadOnlyList<int[]>? segments = null)
    {
        using var scope = NewDisposeScope();
        Tensor h, output;
        using (var n1 = input_layernorm.forward(hidden))
        using (var attention = self_attn.Forward(n1, cos, sin, mask, cache, layer, segments))
            h = hidden + attention;
        using (h)
        using (var n2 = post_attention_layernorm.forward(h))
        using (var m = mlp.Forward(n2))
            output = h + m;
        return output.MoveToOuterDisposeScope();
    }
}
