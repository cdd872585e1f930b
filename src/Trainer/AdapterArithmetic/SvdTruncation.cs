using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// A matrix as LoRA factors of a given rank by truncated SVD, as PEFT's SVD combinations write them:
/// <c>B = U[:, :r]·diag(S[:r])</c>, <c>A = Vh[:r, :]</c> (the best rank-r approximation, Eckart–Young), optionally
/// clamped to ±the <c>clamp</c> quantile of all their values. Float64 on the CPU. Where the matrix has fewer than r
/// singular values the factors are padded with zeros (PEFT would write a tensor of the wrong shape there).
/// </summary>
public static class SvdTruncation
{
    /// <summary>Factors <paramref name="delta"/> [out, in] into A [rank, in] and B [out, rank] (float64, new tensors).</summary>
    public static (Tensor A, Tensor B) Factor(Tensor delta, int rank, double? clamp)
    {
        using var scope = NewDisposeScope();
        var (u, s, vh) = linalg.svd(delta.to(ScalarType.Float64), fullMatrices: false);
        var (a, b) = Finish(u, s, vh, rank, clamp, delta.shape[0], delta.shape[1]);
        return (a.MoveToOuterDisposeScope(), b.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Factors the product <paramref name="p"/>·<paramref name="q"/> ([out, k]·[k, in]) without forming it: with
    /// P = Q₁R₁ and Qᵀ = Q₂R₂, P·Q = Q₁(R₁R₂ᵀ)Q₂ᵀ, so the SVD of the small k×k core gives the same singular values and
    /// vectors as the full matrix's (the exact rank-k delta of <c>cat</c>, at a fraction of a full SVD's cost).
    /// </summary>
    public static (Tensor A, Tensor B) FactorProduct(Tensor p, Tensor q, int rank, double? clamp)
    {
        using var scope = NewDisposeScope();
        var (q1, r1) = linalg.qr(p.to(ScalarType.Float64));
        var (q2, r2) = linalg.qr(q.to(ScalarType.Float64).t());
        var (u, s, vh) = linalg.svd(r1.matmul(r2.t()), fullMatrices: false);
        var (a, b) = Finish(q1.matmul(u), s, vh.matmul(q2.t()), rank, clamp, p.shape[0], q.shape[1]);
        return (a.MoveToOuterDisposeScope(), b.MoveToOuterDisposeScope());
    }

    private static (Tensor A, Tensor B) Finish(Tensor u, Tensor s, Tensor vh, int rank, double? clamp, long rows, long cols)
    {
        long k = Math.Min(rank, s.shape[0]);
        var b = u[.., ..(int)k].mul(s[..(int)k].unsqueeze(0)); // U·diag(S)
        var a = vh[..(int)k, ..];
        if (clamp is { } q)
        {
            double hi = Quantile(cat([b.flatten(), a.flatten()]).data<double>().ToArray(), q);
            b = b.clamp(-hi, hi);
            a = a.clamp(-hi, hi);
        }
        var outA = zeros(rank, cols, dtype: ScalarType.Float64);
        var outB = zeros(rows, rank, dtype: ScalarType.Float64);
        outA[..(int)k, ..] = a;
        outB[.., ..(int)k] = b;
        return (outA, outB);
    }

    /// <summary>torch.quantile's default (linear interpolation between the two nearest ranks): position q·(n−1) of the sorted values.</summary>
    public static double Quantile(double[] values, double q)
    {
        if (!(q >= 0 && q <= 1)) throw new ArgumentException($"quantile {q}: must be in [0, 1]");
        var sorted = (double[])values.Clone();
        Array.Sort(sorted);
        double pos = q * (sorted.Length - 1);
        int lo = (int)Math.Floor(pos), hi = (int)Math.Ceiling(pos);
        return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
    }
}
