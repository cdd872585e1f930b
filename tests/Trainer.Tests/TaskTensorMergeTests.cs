namespace QLora.Trainer.Tests;

/// <summary>PEFT's merge_utils rules on values worked out by hand, and the DARE random stream.</summary>
public class TaskTensorMergeTests
{
    static readonly double[] T1 = [1, -2, 3, 0.5], T2 = [-1, -1, 2, -4], T3 = [0.5, 3, -1, 1];

    [Fact]
    public void TiesElectsTheSignOfTheSumOrOfTheCountAndAveragesTheAgreeingValues()
    {
        // total: sums 0.5, 0 (ties go to +), 4, -2.5 → +, +, +, −; position 0: (1 + 0.5) / 2; 1: only 3; 2: (3 + 2) / 2; 3: only −4.
        Assert.Equal([0.75, 3, 2.5, -4], TaskTensorMerge.Merge(TaskMergeMethod.Ties, [T1, T2, T3], [1, 1, 1], density: 1, MajoritySignMethod.Total));
        // frequency: sign counts +1, −1, +1, +1 → position 1 averages −2 and −1, position 3 averages 0.5 and 1.
        Assert.Equal([0.75, -1.5, 2.5, 0.75], TaskTensorMerge.Merge(TaskMergeMethod.Ties, [T1, T2, T3], [1, 1, 1], density: 1, MajoritySignMethod.Frequency));
    }

    [Fact]
    public void TiesWithNegativeWeightsMatchesTheHandWorkedValues()
    {
        // The sign is elected before the weights apply. Weights 1, −1, 1 (total): election as above (+, +, +, −); position 2: (1·3 + (−1)·2) / 2 = 0.5; position 3: (−1)(−4) = 4.
        Assert.Equal([0.75, 3, 0.5, 4], TaskTensorMerge.Merge(TaskMergeMethod.Ties, [T1, T2, T3], [1, -1, 1], density: 1, MajoritySignMethod.Total));
    }

    [Fact]
    public void MagnitudePruningKeepsIntOfDensityTimesNLargestValues()
    {
        Assert.Equal([0, -2, 3, 0], TaskTensorMerge.PruneByMagnitude(T1, 0.5));
        Assert.Equal([0, -2, 3, 0], TaskTensorMerge.PruneByMagnitude(T1, 0.6)); // int(2.4) = 2
        Assert.Equal([1, -2, 3, 0], TaskTensorMerge.PruneByMagnitude(T1, 0.75));
        Assert.Equal([0, 0, 0, 0], TaskTensorMerge.PruneByMagnitude(T1, 0.2)); // int(0.8) = 0: everything pruned, as PEFT
        Assert.Equal(T1, TaskTensorMerge.PruneByMagnitude(T1, 1));
        Assert.Equal([1, 1, 0, 0], TaskTensorMerge.PruneByMagnitude([1, 1, 1, 1], 0.5)); // equal magnitudes: lower index first
        // magnitude_prune at int(0.25·4) = 1 value each, then the weighted sum: 0.5·[0, 0, 3, 0] + 2·[0, 0, 0, −4].
        Assert.Equal([0, 0, 1.5, -8], TaskTensorMerge.Merge(TaskMergeMethod.MagnitudePrune, [T1, T2], [0.5, 2], density: 0.25));
        // ties with pruning: t1 → [0, 0, 3, 0], t2 → [0, 0, 0, −4], t3 → [0, 3, 0, 0]; each position has one value.
        Assert.Equal([0, 3, 3, -4], TaskTensorMerge.Merge(TaskMergeMethod.Ties, [T1, T2, T3], [1, 1, 1], density: 0.25));
    }

    [Fact]
    public void TaskArithmeticIsTheWeightedSum() =>
        Assert.Equal([2 * 1 - 0.5 * -1, 2 * -2 - 0.5 * -1, 2 * 3 - 0.5 * 2, 2 * 0.5 - 0.5 * -4],
            TaskTensorMerge.Merge(TaskMergeMethod.TaskArithmetic, [T1, T2], [2, -0.5]));

    [Fact]
    public void SplitMix64GivesThePublishedSequence()
    {
        // The reference sequence of Vigna's splitmix64.c for seed 1234567 (also Java's SplittableRandom mixing).
        var g = new SplitMix64(1234567);
        Assert.Equal([6457827717110365317UL, 3203168211198807973UL, 9817491932198370423UL, 4593380528125082431UL, 16408922859458223821UL],
            Enumerable.Range(0, 5).Select(_ => g.Next()).ToArray());
        Assert.Equal(6457827717110365317UL >> 11, (ulong)(new SplitMix64(1234567).NextDouble() * (1UL << 53)));
        // Per-tensor streams: seed XOR FNV-1a-64 of the key ("a": 0xaf63dc4c8601ec8c, FNV's published value).
        Assert.Equal(new SplitMix64(5 ^ 0xaf63dc4c8601ec8cUL).Next(), SplitMix64.ForKey(5, "a").Next());
    }

    [Fact]
    public void DarePruningKeepsAboutDensityOfTheValuesRescaledByOneOverDensity()
    {
        const int n = 200_000;
        var ones = Enumerable.Repeat(1.0, n).ToArray();
        var pruned = TaskTensorMerge.PruneAtRandom(ones, 0.3, rescale: true, new SplitMix64(11));
        int kept = pruned.Count(v => v != 0);
        // Binomial(200 000, 0.3): standard deviation 205; 5 sigma is ~1 000.
        Assert.InRange(kept, 0.3 * n - 1_000, 0.3 * n + 1_000);
        Assert.All(pruned.Where(v => v != 0), v => Assert.Equal(1 / 0.3, v));
        Assert.InRange(pruned.Sum() / n, 0.98, 1.02); // the rescale keeps the expected value
        Assert.Equal(pruned, TaskTensorMerge.PruneAtRandom(ones, 0.3, rescale: true, new SplitMix64(11)));
        Assert.NotEqual(pruned, TaskTensorMerge.PruneAtRandom(ones, 0.3, rescale: true, new SplitMix64(12)));
        // The mask is exactly "uniform < density", one draw per element in order.
        var g = new SplitMix64(11);
        Assert.All(Enumerable.Range(0, 1000), j => Assert.Equal(g.NextDouble() < 0.3, pruned[j] != 0));
        // Density 1 prunes and rescales nothing.
        Assert.Equal(T1, TaskTensorMerge.PruneAtRandom(T1, 1, rescale: true, new SplitMix64(1)));
        Assert.Throws<ArgumentException>(() => TaskTensorMerge.PruneAtRandom(T1, 0, rescale: true, new SplitMix64(1)));
    }
}
