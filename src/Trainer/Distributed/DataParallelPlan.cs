using System.Globalization;

namespace QLora.Trainer;

/// <summary>
/// The throughput model of a data-parallel job, next to its memory plan: every rank holds the whole model (the memory
/// plan's peak is per rank), computes on its share of each step's micro-batches, and exchanges only the LoRA gradients
/// (one float32 buffer per step). Compute shrinks with the number of ranks; the exchange does not, so the ratio of
/// the two says how well the job can scale.
/// </summary>
public sealed record DataParallelPlan
{
    /// <summary>Ranks.</summary>
    public required int Ranks { get; init; }
    /// <summary>Micro-batches of the busiest rank per step.</summary>
    public required int MicroBatchesPerRank { get; init; }
    /// <summary>Tokens of the busiest rank per step (full rows).</summary>
    public required long TokensPerRank { get; init; }
    /// <summary>Model FLOPs of the busiest rank per step: forward, input gradients, the checkpoint recompute, attention.</summary>
    public required double FlopsPerRank { get; init; }
    /// <summary>Bytes of the gradient buffer all-reduced per step (4 per trainable parameter).</summary>
    public required long AllReduceBytes { get; init; }
    /// <summary>Bytes each rank sends (and receives) per step in a ring all-reduce: 2(N−1)/N of the buffer.</summary>
    public long RingBytesPerRank => Ranks <= 1 ? 0 : (long)(2.0 * (Ranks - 1) / Ranks * AllReduceBytes);

    /// <summary>The model for <paramref name="ranks"/> ranks sharing <paramref name="microBatchesPerStep"/> micro-batches per step.</summary>
    public static DataParallelPlan Of(LlamaConfig c, PlanOptions o, MemoryPlan plan, int microBatchesPerStep, int ranks)
    {
        int mine = BatchSharding.Range(microBatchesPerStep, 0, ranks).Count;
        long tokens = (long)mine * o.MicroBatch * o.SequenceLength;
        double q = (double)c.HiddenSize * c.NumAttentionHeads * c.HeadDim, kv = (double)c.HiddenSize * c.NumKeyValueHeads * c.HeadDim;
        double layerLinear = 2 * q + 2 * kv + 3.0 * c.HiddenSize * c.IntermediateSize;
        // Per token: forward 2 FLOPs per weight, input gradient 2 (frozen weights get no weight gradient), and with
        // checkpointing the decoder layers' forward again; attention QK^T and PV: 12·T·hidden per layer (fwd + bwd).
        double perToken = c.NumHiddenLayers * layerLinear * (o.GradientCheckpointing ? 6 : 4) + 4.0 * c.VocabSize * c.HiddenSize
            + 12.0 * c.NumHiddenLayers * o.SequenceLength * c.HiddenSize;
        return new DataParallelPlan
        {
            Ranks = ranks, MicroBatchesPerRank = mine, TokensPerRank = tokens, FlopsPerRank = perToken * tokens,
            AllReduceBytes = 4 * plan.TrainableParameters,
        };
    }

    /// <summary>The log line of a data-parallel job.</summary>
    public static string Describe(LlamaConfig c, PlanOptions o, MemoryPlan plan, int microBatchesPerStep, int ranks, string engine)
    {
        var m = Of(c, o, plan, microBatchesPerStep, ranks);
        return string.Create(CultureInfo.InvariantCulture,
            $"data parallel: {ranks} ranks over {engine}; each rank holds the whole model (peak {ByteSize.Format(plan.PeakBytes)} per rank) and trains " +
            $"{m.MicroBatchesPerRank} of the {microBatchesPerStep} micro-batches of a step: ~{m.FlopsPerRank / 1e9:0.###} GFLOP on ≤ {m.TokensPerRank:N0} tokens per rank, " +
            $"against an all-reduce of {ByteSize.Format(m.AllReduceBytes)} of LoRA gradients ({ByteSize.Format(m.RingBytesPerRank)} sent and received per rank in a ring), " +
            $"{m.FlopsPerRank / Math.Max(1, m.RingBytesPerRank):N0} FLOP per byte exchanged");
    }
}
