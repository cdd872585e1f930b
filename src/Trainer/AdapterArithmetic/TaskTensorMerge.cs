namespace QLora.Trainer;

/// <summary>The element-wise merges of PEFT's <c>merge_utils</c>.</summary>
public enum TaskMergeMethod
{
    /// <summary>Σ wᵢ·tᵢ.</summary>
    TaskArithmetic,
    /// <summary>Keep the top-density fraction of each tensor by magnitude, elect a sign, average what agrees with it.</summary>
    Ties,
    /// <summary>Keep each value with probability density, rescale by 1/density, then Σ wᵢ·tᵢ.</summary>
    DareLinear,
    /// <summary>DARE's random pruning, then TIES's sign election and disjoint mean.</summary>
    DareTies,
    /// <summary>Keep the top-density fraction of each tensor by magnitude, then Σ wᵢ·tᵢ.</summary>
    MagnitudePrune,
}

/// <summary>How TIES elects each element's sign (PEFT's <c>majority_sign_method</c>).</summary>
public enum MajoritySignMethod
{
    /// <summary>The sign of the sum of the (pruned, unweighted) values.</summary>
    Total,
    /// <summary>The sign held by more of the tensors (ties go to +).</summary>
    Frequency,
}

/// <summary>
/// PEFT's task-tensor merges (<c>peft.utils.merge_utils</c>: <c>task_arithmetic</c>, <c>magnitude_prune</c>,
/// <c>ties</c>, <c>dare_linear</c>, <c>dare_ties</c>) over flat float64 tensors of equal length, with PEFT's exact
/// rules: a density ≥ 1 prunes nothing (and DARE then does not rescale); magnitude pruning keeps
/// <c>int(density·n)</c> values (PEFT's <c>topk</c>; among equal magnitudes the lower index is kept, where torch's
/// choice is unspecified); the sign is elected on the pruned tensors before the weights are applied, a zero never
/// agrees with it, and the disjoint mean divides by the number of agreeing tensors (at least 1).
/// </summary>
public static class TaskTensorMerge
{
    /// <summary>
    /// Merges <paramref name="tensors"/> with <paramref name="weights"/> by <paramref name="method"/>. DARE draws one
    /// uniform number per element, in order, from <paramref name="random"/>[i] for tensor i (a value is kept when its
    /// number is below the density).
    /// </summary>
    public static double[] Merge(TaskMergeMethod method, IReadOnlyList<double[]> tensors, IReadOnlyList<double> weights,
        double density = 1, MajoritySignMethod sign = MajoritySignMethod.Total, IReadOnlyList<SplitMix64>? random = null)
    {
        if (tensors.Count == 0 || tensors.Count != weights.Count) throw new ArgumentException($"{tensors.Count} tensors and {weights.Count} weights: need one weight per tensor, at least one");
        int n = tensors[0].Length;
        if (tensors.Any(t => t.Length != n)) throw new ArgumentException("task tensors must have the same number of elements");
        if (method is TaskMergeMethod.DareLinear or TaskMergeMethod.DareTies && (random is null || random.Count != tensors.Count))
            throw new ArgumentException("DARE needs one random stream per tensor");
        var pruned = method switch
        {
            TaskMergeMethod.TaskArithmetic => tensors,
            TaskMergeMethod.Ties or TaskMergeMethod.MagnitudePrune => tensors.Select(t => PruneByMagnitude(t, density)).ToList(),
            _ => tensors.Select((t, i) => PruneAtRandom(t, density, rescale: true, random![i])).ToList(),
        };
        return method is TaskMergeMethod.Ties or TaskMergeMethod.DareTies
            ? DisjointMerge(pruned, weights, MajoritySignMask(pruned, sign))
            : WeightedSum(pruned, weights);
    }

    /// <summary>Σ wᵢ·tᵢ (PEFT's <c>task_arithmetic</c> once pruned).</summary>
    public static double[] WeightedSum(IReadOnlyList<double[]> tensors, IReadOnlyList<double> weights)
    {
        var sum = new double[tensors[0].Length];
        for (int i = 0; i < tensors.Count; i++)
        {
            var t = tensors[i];
            double w = weights[i];
            for (int j = 0; j < sum.Length; j++) sum[j] += t[j] * w;
        }
        return sum;
    }

    /// <summary>
    /// PEFT's <c>magnitude_based_pruning</c>: a copy of <paramref name="t"/> keeping its <c>int(density·n)</c> largest
    /// magnitudes (lower index first among equals) and zero elsewhere; density ≥ 1 keeps everything.
    /// </summary>
    public static double[] PruneByMagnitude(double[] t, double density)
    {
        CheckDensity(density);
        if (density >= 1) return (double[])t.Clone();
        long k = (long)(density * t.Length); // Python's int(density * numel): truncation of the double product
        var kept = new double[t.Length];
        if (k == 0) return kept;
        // The k-th largest magnitude; everything above it is kept, then values equal to it by index until k are kept.
        var magnitudes = new double[t.Length];
        for (int j = 0; j < t.Length; j++) magnitudes[j] = Math.Abs(t[j]);
        Array.Sort(magnitudes);
        double threshold = magnitudes[t.Length - k];
        long above = 0;
        for (int j = 0; j < t.Length; j++)
        {
            if (Math.Abs(t[j]) > threshold) { kept[j] = t[j]; above++; }
        }
        for (int j = 0; j < t.Length && above < k; j++)
        {
            if (Math.Abs(t[j]) == threshold) { kept[j] = t[j]; above++; }
        }
        return kept;
    }

    /// <summary>
    /// PEFT's <c>random_pruning</c>: each value kept when its uniform number from <paramref name="random"/> is below
    /// <paramref name="density"/> (a Bernoulli(density) mask), divided by the density when <paramref name="rescale"/>;
    /// density ≥ 1 keeps everything unscaled and draws nothing.
    /// </summary>
    public static double[] PruneAtRandom(double[] t, double density, bool rescale, SplitMix64 random)
    {
        CheckDensity(density);
        if (density >= 1) return (double[])t.Clone();
        var kept = new double[t.Length];
        for (int j = 0; j < t.Length; j++)
        {
            if (random.NextDouble() < density) kept[j] = rescale ? t[j] / density : t[j];
        }
        return kept;
    }

    /// <summary>
    /// PEFT's <c>calculate_majority_sign_mask</c>: per element, the elected sign is + when the sum of the values
    /// (<see cref="MajoritySignMethod.Total"/>) or of their signs (<see cref="MajoritySignMethod.Frequency"/>) is ≥ 0,
    /// else −; mask[i][j] is true where tensor i has that sign (a zero has none).
    /// </summary>
    public static bool[][] MajoritySignMask(IReadOnlyList<double[]> tensors, MajoritySignMethod method)
    {
        int n = tensors[0].Length;
        var mask = tensors.Select(_ => new bool[n]).ToArray();
        for (int j = 0; j < n; j++)
        {
            double s = 0;
            foreach (var t in tensors) s += method == MajoritySignMethod.Total ? t[j] : Math.Sign(t[j]);
            int elected = s >= 0 ? 1 : -1;
            for (int i = 0; i < tensors.Count; i++) mask[i][j] = Math.Sign(tensors[i][j]) == elected;
        }
        return mask;
    }

    /// <summary>PEFT's <c>disjoint_merge</c> of the weighted tensors: Σ over agreeing i of wᵢ·tᵢ, divided by max(1, how many agree).</summary>
    public static double[] DisjointMerge(IReadOnlyList<double[]> tensors, IReadOnlyList<double> weights, bool[][] mask)
    {
        int n = tensors[0].Length;
        var merged = new double[n];
        for (int j = 0; j < n; j++)
        {
            double sum = 0;
            int count = 0;
            for (int i = 0; i < tensors.Count; i++)
            {
                if (!mask[i][j]) continue;
                sum += tensors[i][j] * weights[i];
                count++;
            }
            merged[j] = sum / Math.Max(count, 1);
        }
        return merged;
    }

    private static void CheckDensity(double density)
    {
        if (!(density > 0)) throw new ArgumentException($"density {density}: must be in (0, 1] (the fraction of values kept)");
    }
}
