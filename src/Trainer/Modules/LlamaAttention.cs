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

    /// <summary>
    /// Grouped-query attention a K/V group at a time (<see cref="GroupedQueryAttention"/>) instead of over repeated K/V
    /// heads, for causal attention without a mask, a cache or segments: less memory, one more attention forward in backward.
    /// </summary>
    public bool AttentionByGroup { get; set; }

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
    /// Causal attention within each segment of each row (<paramref name="segments"/>: per row the segment lengths, in
    /// order): what a block-diagonal causal mask computes, on the memory-efficient SDPA path, with no [T, T] mask.
    /// </summary>
    public static Tensor SegmentedAttention(Tensor q, Tensor k, Tensor v, IReadOnlyList<int[]> segments)
    {
        using var scope = NewDisposeScope();
        var rows = new List<Tensor>();
        for (int r = 0; r < segments.Count; r++)
        {
            var parts = new List<Tensor>();
            long start = 0;
            foreach (int length in segments[r])
            {
                using var qs = q.narrow(0, r, 1).narrow(2, start, length);
                using var ks = k.narrow(0, r, 1).narrow(2, start, length);
                using var vs = v.narrow(0, r, 1).narrow(2, start, length);
                parts.Add(nn.functional.scaled_dot_product_attention(qs, ks, vs, is_casual: true));
                start += length;
            }
            if (start != q.shape[2]) throw new ArgumentException($"row {r}: the segments cover {start} tokens of {q.shape[2]}");
            rows.Add(parts.Count == 1 ? parts[0] : cat(parts, 2));
            if (parts.Count > 1) foreach (var p in parts) p.Dispose();
        }
        var result = rows.Count == 1 ? rows[0] : cat(rows, 0);
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// As <see cref="Forward(Tensor, Tensor, Tensor, Tensor?)"/>, appending this step's keys and values to layer
    /// <paramref name="layer"/> of <paramref name="cache"/> and attending over everything cached (inference).
    /// </summary>
    public Tensor Forward(Tensor hidden, Tensor cos, Tensor sin, Tensor? mask, KvCache? cache, int layer, IReadOnlyList<int[]>? segments = null)
    {
        using var scope = NewDisposeScope();
        long b = hidden.shape[0], t = hidden.shape[1];
        int nh = _config.NumAttentionHeads, nkv = _config.NumKeyValueHeads, hd = _config.HeadDim;
        // Handles are dropped as soon as the next op has their tensor, so [tokens, heads·dim] temporaries do not live
        // until this method returns (what SDPA and the LoRA branches save, autograd keeps).
        Tensor Heads(string projection, int heads, RmsNorm? norm)
        {
            using var y = Projection(projection).forward(hidden);
            using var split = y.view(b, t, heads, hd);
            if (norm is null) return split.transpose(1, 2); // every other handle on the storage is gone: disposing this one frees it
            using var normed = norm.forward(split);          // Qwen3 / Gemma 3 q/k norms, per head
            return normed.transpose(1, 2);
        }
        Tensor q = Heads("q_proj", nh, QNorm), k = Heads("k_proj", nkv, KNorm), v = Heads("v_proj", nkv, null); // this order: LoRA dropout draws in it
        using (var raw = q) q = RotaryEmbedding.Apply(raw, cos, sin);
        using (var raw = k) k = RotaryEmbedding.Apply(raw, cos, sin);
        bool prefix = false;
        if (cache is not null)
        {
            prefix = cache.Length > 0;
            (k, v) = cache.Append(layer, k, v);
        }
        bool byGroup = AttentionByGroup && nkv != nh && segments is null && mask is null && cache is null && _config.Gemma?.AttnLogitSoftcapping is null;
        if (nkv != nh && !byGroup)
        {
            int rep = nh / nkv;
            using (var grouped = k) k = grouped.repeat_interleave(rep, 1);
            using (var grouped = v) v = grouped.repeat_interleave(rep, 1);
        }
        Tensor attn;
        // Gemma scales scores by query_pre_attn_scalar^-½, not head_dim^-½.
        double scale = _config.Gemma is { } gemma ? 1.0 / Math.Sqrt(gemma.QueryPreAttnScalar) : 1.0 / Math.Sqrt(hd);
        if (_config.Gemma?.AttnLogitSoftcapping is double cap)
        {
            if (segments is not null) throw new NotSupportedException("segment attention does not apply to soft-capped attention (Gemma 2); turn Training:SegmentAttention off for this model");
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
        if (factor != 1.0) using (var unscaled = q) q = unscaled * factor;
        if (byGroup) attn = GroupedQueryAttention.Apply(q, k, v);
        else if (segments is not null && cache is null) attn = SegmentedAttention(q, k, v, segments);
        else if (mask is not null) attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask: mask);
        else if (!prefix) attn = nn.functional.scaled_dot_product_attention(q, k, v, is_casual: true);
        else
        {
            // New tokens after a cached prefix: each sees the whole prefix and the new tokens up to itself.
            long past = k.shape[2] - t;
            var allowed = ones(t, t, dtype: ScalarType.Bool, device: q.device).tril();
            var full = cat([ones(t, past, dtype: ScalarType.Bool, device: q.device), allowed], 1);
            attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask: full.view(1, 1, t, k.shape[2]));
        }
        Tensor merged;
        using (attn)
        using (var byToken = attn.transpose(1, 2))
            merged = byToken.reshape(b, t, nh * hd);
        q.Dispose(); k.Dispose(); v.Dispose();
        using (merged) return Projection("o_proj").forward(merged).MoveToOuterDisposeScope();
    }
}
