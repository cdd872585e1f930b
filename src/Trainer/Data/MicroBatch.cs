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
    /// <summary>The "may attend" mask, or null for plain causal attention.</summary>
    public Tensor? AttentionMask { get; }
    /// <summary>Targets after the causal shift (the loss's token count).</summary>
    public long TargetTokens { get; }
    /// <summary>Tokens in the batch that are not padding.</summary>
    public long RealTokens { get; }

    MicroBatch(Tensor ids, Tensor labels, Tensor pos, Tensor? mask, long targets, long real)
    {
        InputIds = ids; Labels = labels; PositionIds = pos; AttentionMask = mask; TargetTokens = targets; RealTokens = real;
    }

    /// <summary>Builds the tensors on <paramref name="device"/> (null: the CPU); a mask is made when some row packs several samples.</summary>
    public static MicroBatch Create(IReadOnlyList<TokenRow> rows, int padId, Device? device = null)
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
        if (packed)
        {
            var m = new bool[b * t * t];
            for (int r = 0; r < b; r++)
                for (int i = 0; i < t; i++)
                    for (int j = 0; j <= i; j++)
                        m[(r * t + i) * t + j] = seg[r * t + i] == seg[r * t + j];
            mask = tensor(m, [b, 1, t, t], device: device);
        }
        return new MicroBatch(tensor(ids, [b, t], device: device), tensor(labels, [b, t], device: device), tensor(pos, [b, t], device: device),
            mask, targets, real);
    }

    /// <summary>Releases the tensors.</summary>
    public void Dispose()
    {
        InputIds.Dispose(); Labels.Dispose(); PositionIds.Dispose(); AttentionMask?.Dispose();
    }
}
