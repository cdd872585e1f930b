using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Grouped-query self-attention with rotary embeddings and causal SDPA (HF: <c>self_attn</c> with q/k/v/o_proj; Qwen3 adds
/// <c>q_norm</c> / <c>k_norm</c>, RMSNorms over each head applied before RoPE).
/// </summary>
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

    /// <summary>As the four-projection constructor, with Qwen3's per-head query and key norms (over head_dim).</summary>
    public LlamaAttention(LlamaConfig config, nn.Module<Tensor, Tensor> q, nn.Module<Tensor, Tensor> k, nn.Module<Tensor, Tensor> v, nn.Module<Tensor, Tensor> o,
        RmsNorm qNorm, RmsNorm kNorm) : this(config, q, k, v, o)
    {
        QNorm = qNorm;
        KNorm = kNorm;
        register_module("q_norm", qNorm);
        register_module("k_norm", kNorm);
    }

    /// <summary>Qwen3's query norm (HF <c>q_norm</c>), or null.</summary>
    public RmsNorm? QNorm { get; }

    /// <summary>Qwen3's key norm (HF <c>k_norm</c>), or null.</summary>
    public RmsNorm? KNorm { get; }

    /// <summary>
    /// Attention over <paramref name="hidden"/> [B, T, H]. <paramref name="mask"/> is null (causal), or a boolean
    /// [B, 1, T, T] mask where true means "may attend" (packed sequences).
    /// </summary>
    public Tensor Forward(Tensor hidden, Tensor cos, Tensor sin, Tensor? mask) => Forward(hidden, cos, sin, mask, null, 0);

    /// <summary>
    /// As <see cref="Forward(Tensor, Tensor, Tensor, Tensor?)"/>, appending this step's keys and values to layer
    /// <paramref name="layer"/> of <paramref name="cache"/> and attending over everything cached (inference).
    /// </summary>
    public Tensor Forward(Tensor hidden, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        long b = hidden.shape[0], t = hidden.shape[1];
        int nh = _config.NumAttentionHeads, nkv = _config.NumKeyValueHeads, hd = _config.HeadDim;
        var q = Projection("q_proj").forward(hidden).view(b, t, nh, hd);
        var k = Projection("k_proj").forward(hidden).view(b, t, nkv, hd);
        if (QNorm is not null) q = QNorm.forward(q);
        if (KNorm is not null) k = KNorm.forward(k);
        q = q.transpose(1, 2);
        k = k.transpose(1, 2);
        var v = Projection("v_proj").forward(hidden).view(b, t, nkv, hd).transpose(1, 2);
        q = RotaryEmbedding.Apply(q, cos, sin);
        k = RotaryEmbedding.Apply(k, cos, sin);
        bool prefix = false;
        if (cache is not null)
        {
            prefix = cache.Length > 0;
            (k, v) = cache.Append(layer, k, v);
        }
        if (nkv != nh)
        {
            int rep = nh / nkv;
            k = k.repeat_interleave(rep, 1);
            v = v.repeat_interleave(rep, 1);
        }
        Tensor attn;
        // Gemma scales scores by query_pre_attn_scalar^-½, not head_dim^-½.
        double scale = _config.Gemma is { } gemma ? 1.0 / Math.Sqrt(gemma.QueryPreAttnScalar) : 1.0 / Math.Sqrt(hd);
        if (_config.Gemma?.AttnLogitSoftcapping is double cap)
        {
            // Gemma 2's soft-capped scores, as transformers' eager attention: cap · tanh(q·kᵀ·scale / cap), mask, softmax in float32.
            long s = k.shape[2], past = s - t;
            var allowed = mask ?? cat([ones(t, past, dtype: ScalarType.Bool, device: q.device), ones(t, t, dtype: ScalarType.Bool, device: q.device).tril()], 1).view(1, 1, t, s);
            var scores = q.matmul(k.transpose(-2, -1)) * scale;
            scores = (scores / cap).tanh() * cap;
            scores = scores.masked_fill(allowed.logical_not(), double.NegativeInfinity);
            attn = scores.softmax(-1, ScalarType.Float32).to(q.dtype).matmul(v);
            return Projection("o_proj").forward(attn.transpose(1, 2).reshape(b, t, nh * hd)).MoveToOuterDisposeScope();
        }
        double factor = scale * Math.Sqrt(hd); // SDPA divides by √head_dim itself
        if (factor != 1.0) q = q * factor;
        if (mask is not null) attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask: mask);
        else if (!prefix) attn = nn.functional.scaled_dot_product_attention(q, k, v, is_casual: true);
        else
        {
            // New tokens after a cached prefix: each sees the whole prefix and the new tokens up to itself.
            long past = k.shape[2] - t;
            var allowed = ones(t, t, dtype: ScalarType.Bool, device: q.device).tril();
            var full = cat([ones(t, past, dtype: ScalarType.Bool, device: q.device), allowed], 1);
            attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask: full.view(1, 1, t, k.shape[2]));
        }
        var merged = attn.transpose(1, 2).reshape(b, t, nh * hd);
        return Projection("o_proj").forward(merged).MoveToOuterDisposeScope();
    }
}
