namespace QLora.Trainer;

/// <summary>
/// The order of micro-batches in each epoch, a pure function of the seed and the epoch: packed rows are shuffled and
/// cut into micro-batches; unpacked rows are grouped by length (sorted within windows of 64 micro-batches, then the
/// batches shuffled), so padding stays small. A position in the schedule (epoch, index) is all a checkpoint needs to
/// resume the data stream exactly.
/// </summary>
public sealed class BatchSchedule(IReadOnlyList<TokenRow> rows, int microBatchSize, bool shuffle, bool groupByLength, int seed)
{
    /// <summary>The rows scheduled.</summary>
    public IReadOnlyList<TokenRow> Rows { get; } = rows;

    /// <summary>Micro-batches per epoch.</summary>
    public int BatchesPerEpoch => (Rows.Count + microBatchSize - 1) / microBatchSize;

    /// <summary>The row indices of each micro-batch of <paramref name="epoch"/>.</summary>
    public List<int[]> Epoch(int epoch)
    {
        var order = Enumerable.Range(0, Rows.Count).ToArray();
        var rng = new Random(unchecked(seed * 1_000_003 + epoch));
        if (shuffle) rng.Shuffle(order);
        if (groupByLength)
        {
            int window = microBatchSize * 64;
            for (int start = 0; start < order.Length; start += window)
            {
                int len = Math.Min(window, order.Length - start);
                Array.Sort(order, start, len, Comparer<int>.Create((a, b) => Rows[b].InputIds.Length.CompareTo(Rows[a].InputIds.Length) is var c && c != 0 ? c : a.CompareTo(b)));
            }
        }
        var batches = new List<int[]>();
        for (int i = 0; i < order.Length; i += microBatchSize) batches.Add(order[i..Math.Min(order.Length, i + microBatchSize)]);
        if (groupByLength && shuffle) rng.Shuffle(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(batches));
        return batches;
    }
}
