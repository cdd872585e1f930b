namespace QLora.Trainer;

/// <summary>The statistics every benchmark reports, in one place: medians, because these machines are shared and noisy.</summary>
public static class BenchStatistics
{
    /// <summary>The median (the mean of the middle two for an even count).</summary>
    public static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        if (sorted.Length == 0) throw new ArgumentException("the median of no values", nameof(values));
        int m = sorted.Length / 2;
        return sorted.Length % 2 == 1 ? sorted[m] : (sorted[m - 1] + sorted[m]) / 2;
    }

    // Two-sided 95 % quantiles of Student's t for 1-30 degrees of freedom (standard tables, three decimals).
    static readonly double[] T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042];

    /// <summary>
    /// The 97.5 % quantile of Student's t with <paramref name="degreesOfFreedom"/>: the half-width factor of a 95 %
    /// interval of a mean of that many + 1 values. Tabulated to 30; beyond, the normal quantile with two terms of its
    /// Cornish-Fisher expansion (z + (z³ + z)/4ν + (5z⁵ + 16z³ + 3z)/96ν²: within 0.0005 of the exact value there).
    /// </summary>
    public static double StudentT975(int degreesOfFreedom)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(degreesOfFreedom, 1);
        if (degreesOfFreedom <= T975.Length) return T975[degreesOfFreedom - 1];
        const double z = 1.959964;
        double z3 = z * z * z, z5 = z3 * z * z, v = degreesOfFreedom;
        return z + (z3 + z) / (4 * v) + (5 * z5 + 16 * z3 + 3 * z) / (96 * v * v);
    }

    /// <summary>The mean of <paramref name="values"/> and its 95 % interval (Student's t; at least two values).</summary>
    public static (double Mean, double Low, double High) MeanInterval95(IReadOnlyList<double> values)
    {
        if (values.Count < 2) throw new ArgumentException("an interval needs at least two values", nameof(values));
        double mean = values.Average();
        double sd = Math.Sqrt(values.Sum(v => (v - mean) * (v - mean)) / (values.Count - 1));
        double half = StudentT975(values.Count - 1) * sd / Math.Sqrt(values.Count);
        return (mean, mean - half, mean + half);
    }
}
