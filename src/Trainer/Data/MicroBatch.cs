using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Rows as tensors for one forward/backward pass: input ids and labels [B, T] (right-padded with the pad id and −100),
/// position ids [B, T], and for packed rows a boolean [B, 1, T, T] mask that lets each token see only earlier tokens of
/// its own sample (padding forms its own segment, so no attention row is empty).
/// </summary>
public sealed class MicroBatch : IDisposable
{
    /// <summary>Token ids [B, T].</summary>
    public Tensor InputIds { get; }
    /// <summary>Unshifted labels [B, T].</summary>
    public Tensor Labels { get; }
    /// <summary>Position ids [B, T].</summary>
    public Tensor PositionIds { get; }
    /// <summary>The "may attend" mask, or null for plain causal attention (or when <see cref="Segments"/> replaces it).</summary>
    public Tensor? AttentionMask { get; }
    /// <summary>
    /// For packed rows built with segment attention: each row's runs of tokens that attend among themselves (causally),
    /// in order, as lengths; the model attends segment by segment and no [T, T] mask exists. Null otherwise.
    /// </summary>
    public IReadOnlyList<int[]>? Segments { get; }
    /// <summary>Targets after the causal shift (the loss's token count).</summary>
    public long TargetTokens { get; }
    /// <summary>Tokens in the batch that are not padding.</summary>
    public long RealTokens { get; }

    MicroBatch(Tensor ids, Tensor labels, Tensor pos, Tensor? mask, IReadOnlyList<int[]>? segments, long targets, long real)
    {
        InputIds = ids; Labels = labels; PositionIds = pos; AttentionMask = mask; Segments = segments; TargetTokens = targets; RealTokens = real;
    }

    /// <summary>
    /// Builds the tensors on <paramref name="device"/> (null: the CPU); when some row packs several samples, a mask is made,
    /// or with <paramref name="segmentAttention"/> the rows' segments instead (the same attention without a [B, 1, T, T] mask).
    /// </summary>
    public static MicroBatch Create(IReadOnlyList<TokenRow> rows, int padId, Device? device = null, bool segmentAttention = false)
    {
        int b = rows.Count, t = rows.Max(r => r.InputIds.Length);
        var ids = new long[b * t];
        var labels = new long[b * t];
        var pos = new long[b * t];
        var seg = new int[b * t];
        long targets = 0, real = 0;
        bool packed = rows.Any(r => r.SampleCount > 1);
        for (int r = 0; r < b; r++)
        {
            var row = rows[r];
            for (int i = 0; i < t; i++)
            {
                int k = r * t + i;
                if (i < row.InputIds.Length)
                {
                    ids[k] = row.InputIds[i]; labels[k] = row.Labels[i]; pos[k] = row.PositionIds[i]; seg[k] = row.Segments[i];
                    real++;
                }
                else
                {
                    ids[k] = padId; labels[k] = CausalLmLoss.IgnoreIndex; pos[k] = i; seg[k] = -1;
                }
            }
            targets += row.ShiftedTargetCount;
        }
        Tensor? mask = null;
        List<int[]>? segments = null;
        if (packed && segmentAttention)
        {
            segments = [];
            for (int r = 0; r < b; r++)
            {
                var lengths = new List<int>();
                int start = 0;
                for (int i = 1; i <= t; i++)
                    if (i == t || seg[r * t + i] != seg[r * t + start])
                    {
                        lengths.Add(i - start);
                        start = i;
                    }
                segments.Add([.. lengths]);
            }
        }
        else if (packed)
        {
            // [B, 1, T, T]: same segment and not later. Built by torch, since B·T·T exceeds an array's index range
            // at the sequence lengths allowed (65536² > 2³¹); the memory planner counts its bytes.
            using var scope = NewDisposeScope();
            var segIds = tensor(seg, [b, t], device: device);
            var same = segIds.unsqueeze(2).eq(segIds.unsqueeze(1));
            var causal = ones([t, t], ScalarType.Bool, device: device).tril_();
            mask = same.logical_and_(causal).unsqueeze(1).MoveToOuterDisposeScope();
        }
        return new MicroBatch(tensor(ids, [b, t], device: device), tensor(labels, [b, t], device: device), tensor(pos, [b, t], device: device),
            mask, segments, targets, real);
    }

    /// <summary>Releases the tensors.</summary>
    public void Dispose()
    {
        InputIds.Dispose(); Labels.Dispose(); PositionIds.Dispose(); AttentionMask?.Dispose();
    }
}
