using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Causal-LM cross-entropy in float32 over the tokens whose (shifted) label is not −100, computed in chunks of tokens:
/// each chunk's logits are produced, upcast and reduced inside a checkpoint, so neither the full fp32 nor the full
/// 16-bit logits ever exist at once. Returns the summed loss and the number of target tokens, so gradient accumulation
/// can normalise by the target tokens of the whole accumulated batch.
/// </summary>
public static class CausalLmLoss
{
    /// <summary>Labels with this value are ignored (PyTorch's ignore_index).</summary>
    public const long IgnoreIndex = -100;

    /// <summary>
    /// Σ CE(lmHead(hidden[:, t]), labels[:, t+1]) over unmasked targets, and their count. <paramref name="hidden"/> is
    /// [B, T, H] (after the final norm), <paramref name="labels"/> [B, T] int64.
    /// </summary>
    public static (Tensor Sum, long Tokens) Compute(Tensor hidden, Tensor labels, Func<Tensor, Tensor> lmHead, int chunkTokens = LlamaForCausalLM.DefaultLossChunkTokens)
    {
        if (chunkTokens <= 0) throw new ArgumentOutOfRangeException(nameof(chunkTokens), "chunk size must be positive");
        if (labels.shape[0] != hidden.shape[0] || labels.shape[1] != hidden.shape[1])
            throw new ArgumentException($"labels [{string.Join(", ", labels.shape)}] do not match hidden states [{string.Join(", ", hidden.shape)}]");
        long t = hidden.shape[1], h = hidden.shape[2];
        using var scope = NewDisposeScope();
        var states = hidden.narrow(1, 0, t - 1).reshape(-1, h);
        var targets = labels.narrow(1, 1, t - 1).reshape(-1);
        var keep = targets.ne(IgnoreIndex).nonzero().squeeze(1);
        long n = keep.shape[0];
        if (n == 0) return (zeros([], dtype: ScalarType.Float32, device: hidden.device).MoveToOuterDisposeScope(), 0);
        var selected = states.index_select(0, keep);
        var selectedTargets = targets.index_select(0, keep);
        Tensor total = zeros([], dtype: ScalarType.Float32, device: hidden.device);
        for (long start = 0; start < n; start += chunkTokens)
        {
            long len = Math.Min(chunkTokens, n - start);
            var chunk = Checkpoint.Run((x, c) =>
            {
                using var inner = NewDisposeScope();
                var logits = lmHead(x).to(ScalarType.Float32);
                return nn.functional.cross_entropy(logits, c[0], reduction: nn.Reduction.Sum).MoveToOuterDisposeScope();
            }, selected.narrow(0, start, len), selectedTargets.narrow(0, start, len));
            total = total + chunk;
        }
        return (total.MoveToOuterDisposeScope(), n);
    }
}
