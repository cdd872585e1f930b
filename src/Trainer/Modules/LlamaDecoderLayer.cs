using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// One pre-norm decoder layer: h + attn(norm(h)), then + mlp(norm(·)). HF names: input_layernorm, self_attn,
/// post_attention_layernorm, mlp. Gemma's sandwich layout norms the outputs too: h + post_attention_layernorm(attn(input_layernorm(h))),
/// then + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(·))).
/// </summary>
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

    /// <summary>Gemma's sandwich layer: <paramref name="postAttentionNorm"/> norms the attention output, the feed-forward norms surround the MLP.</summary>
    public LlamaDecoderLayer(RmsNorm inputNorm, LlamaAttention attention, RmsNorm postAttentionNorm, RmsNorm preFeedforwardNorm, LlamaMlp mlp, RmsNorm postFeedforwardNorm)
        : this(inputNorm, attention, postAttentionNorm, mlp)
    {
        pre_feedforward_layernorm = preFeedforwardNorm;
        post_feedforward_layernorm = postFeedforwardNorm;
        register_module("pre_feedforward_layernorm", preFeedforwardNorm);
        register_module("post_feedforward_layernorm", postFeedforwardNorm);
    }

    /// <summary>Gemma: norm before the MLP (then <see cref="post_attention_layernorm"/> norms the attention output), or null.</summary>
    public RmsNorm? pre_feedforward_layernorm { get; }
    /// <summary>Gemma: norm of the MLP output, or null.</summary>
    public RmsNorm? post_feedforward_layernorm { get; }

    /// <summary>Norm before attention.</summary>
    public RmsNorm input_layernorm { get; }
    /// <summary>Self-attention.</summary>
    public LlamaAttention self_attn { get; }
    /// <summary>Norm before the MLP.</summary>
    public RmsNorm post_attention_layernorm { get; }
    /// <summary>Feed-forward.</summary>
    public LlamaMlp mlp { get; }

    /// <summary>The layer's output for hidden states [B, T, H].</summary>
    public Tensor Forward(Tensor hidden, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache = null, int layer = 0)
    {
        using var scope = NewDisposeScope();
        if (pre_feedforward_layernorm is not null && post_feedforward_layernorm is not null)
        {
            var attended = hidden + post_attention_layernorm.forward(self_attn.Forward(input_layernorm.forward(hidden), cos, sin, mask, cache, layer));
            return (attended + post_feedforward_layernorm.forward(mlp.Forward(pre_feedforward_layernorm.forward(attended)))).MoveToOuterDisposeScope();
        }
        var h = hidden + self_attn.Forward(input_layernorm.forward(hidden), cos, sin, mask, cache, layer);
        var output = h + mlp.Forward(post_attention_layernorm.forward(h));
        return output.MoveToOuterDisposeScope();
    }
}
