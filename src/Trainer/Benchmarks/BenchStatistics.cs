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
}
