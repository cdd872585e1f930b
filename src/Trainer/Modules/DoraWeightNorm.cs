using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// DoRA's weight norm: the L2 norm of each output row of <c>W + scaling·B·A</c> (PEFT's <c>get_weight_norm</c>, "column
/// norm" in the paper's [in, out] notation), in float32 and without gradient (PEFT detaches it). Computed in chunks of
/// rows so the float32 temporaries stay bounded whatever the weight's size: the caller's weight (a dequantized 4-bit
/// tile or a dense weight) is the only full-size tensor.
/// </summary>
public static class DoraWeightNorm
{
    /// <summary>
    /// Elements of one float32 row chunk (16 Mi, 64 MB): a chunk of W, of B·A and their sum are alive together, so the
    /// transient float32 memory is at most three times this beside the weight itself.
    /// </summary>
    public const long ChunkElements = 1L << 24;

    /// <summary>Rows of a [<paramref name="outFeatures"/>, <paramref name="inFeatures"/>] weight per chunk of at most <paramref name="chunkElements"/> (at least one row).</summary>
    public static long ChunkRows(long outFeatures, long inFeatures, long chunkElements = ChunkElements) =>
        Math.Clamp(chunkElements / Math.Max(1, inFeatures), 1, Math.Max(1, outFeatures));

    /// <summary>
    /// ‖W + scaling·B·A‖ per row of <paramref name="weight"/> [out, in] (any float dtype, on any device), with
    /// <paramref name="loraB"/> [out, r] and <paramref name="loraA"/> [r, in]; a float32 [out] tensor on the weight's device.
    /// <paramref name="chunkElements"/> bounds one float32 chunk (tests make it small).
    /// </summary>
    public static Tensor Compute(Tensor weight, Tensor loraB, Tensor loraA, double scaling, long chunkElements = ChunkElements)
    {
        long outF = weight.shape[0], inF = weight.shape[1];
        if (loraB.shape[0] != outF || loraA.shape[1] != inF || loraB.shape[1] != loraA.shape[0])
            throw new ArgumentException($"W [{outF}, {inF}], B [{string.Join(", ", loraB.shape)}] and A [{string.Join(", ", loraA.shape)}] do not fit");
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var result = empty(outF, dtype: ScalarType.Float32, device: weight.device);
        var a = loraA.detach().to(ScalarType.Float32);
        var b = loraB.detach().to(ScalarType.Float32);
        long rows = ChunkRows(outF, inF, chunkElements);
        for (long r0 = 0; r0 < outF; r0 += rows)
        {
            using var inner = NewDisposeScope();
            long n = Math.Min(rows, outF - r0);
            var w = weight.narrow(0, r0, n).to(ScalarType.Float32);
            var delta = b.narrow(0, r0, n).matmul(a);
            var sum = delta.mul_(scaling).add_(w);
            result.narrow(0, r0, n).copy_(linalg.vector_norm(sum, 2, [1], false));
        }
        return result.MoveToOuterDisposeScope();
    }
}
