using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>Grouped-query self-attention with rotary embeddings and causal SDPA (HF: <c>self_attn</c> with q/k/v/o_proj).</summary>
public sealed class LlamaAttention : ProjectionHost
{
    private readonly LlamaConfig _config;

    /// <summary>Takes the four projections (frozen Linear4bit or dense Linear).</summary>
    public LlamaAttention(LlamaConfig config, nn.Module<Tensor, Tensor> q, nn.Module<Tensor, Tensor> k, nn.Module<Tensor, Tensor> v, nn.Module<Tensor, Tensor> o)
        : base("LlamaAttention")
    {
        _config = config;
        foreach (var (name, m) in new[] { ("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o) }) AddProjection(name, m);
    }

    /// <summary>
    /// Attention over <paramref name="hidden"/> [B, T, H]. <paramref name="mask"/> is null (causal), or a boolean
    /// [B, 1, T, T] mask where true means "may attend" (packed sequences).
    /// </summary>
    public Tensor Forward(Tensor hidden, Tensor cos, Tensor sin, Tensor? mask)
    {
        using var scope = NewDisposeScope();
        long b = hidden.shape[0], t = hidden.shape[1];
        int nh = _config.NumAttentionHeads, nkv = _config.NumKeyValueHeads, hd = _config.HeadDim;
        var q = Projection("q_proj").forward(hidden).view(b, t, nh, hd).transpose(1, 2);
        var k = Projection("k_proj").forward(hidden).view(b, t, nkv, hd).transpose(1, 2);
        var v = Projection("v_proj").forward(hidden).view(b, t, nkv, hd).transpose(1, 2);
        q = RotaryEmbedding.Apply(q, cos, sin);
        k = RotaryEmbedding.Apply(k, cos, sin);
        if (nkv != nh)
        {
            int rep = nh / nkv;
            k = k.repeat_interleave(rep, 1);
            v = v.repeat_interleave(rep, 1);
        }
        var attn = mask is null
            ? nn.functional.scaled_dot_product_attention(q, k, v, is_casual: true)
            : nn.functional.scaled_dot_product_attention(q, k, v, attn_mask: mask);
        var merged = attn.transpose(1, 2).reshape(b, t, nh * hd);
        return Projection("o_proj").forward(merged).MoveToOuterDisposeScope();
    }
}
