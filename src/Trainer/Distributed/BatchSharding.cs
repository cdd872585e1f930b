namespace QLora.Trainer;

/// <summary>
/// Which of a global step's micro-batches a rank trains on. The global step's micro-batches are a function of the seed,
/// the epoch and the step (<see cref="BatchSchedule"/> and the step's position in it, the same on every rank); rank r of
/// N takes a contiguous block of them, the first <c>count mod N</c> ranks one more, so the union over the ranks is the
/// global batch whatever N is, and no two ranks share a micro-batch.
/// </summary>
public static class BatchSharding
{
    /// <summary>The first micro-batch and the number of micro-batches of <paramref name="rank"/> among <paramref name="worldSize"/>.</summary>
    public static (int Start, int Count) Range(int count, int rank, int worldSize)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        ArgumentOutOfRangeException.ThrowIfLessThan(worldSize, 1);
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"ranks are 0 to {worldSize - 1}");
        int each = count / worldSize, extra = count % worldSize;
        return (rank * each + Math.Min(rank, extra), each + (rank < extra ? 1 : 0));
    }

    /// <summary>The micro-batches of <paramref name="rank"/>, in their global order.</summary>
    public static IReadOnlyList<T> Shard<T>(IReadOnlyList<T> microBatches, int rank, int worldSize)
    {
        if (worldSize == 1) return microBatches;
        var (start, n) = Range(microBatches.Count, rank, worldSize);
        return [.. microBatches.Skip(start).Take(n)];
    }
}
