namespace QLora.Trainer;

/// <summary>
/// One row of a micro-batch before padding: token ids, unshifted labels, position ids that restart at 0 for each packed
/// sample, and the segment (sample index within the row) of each position, which confines attention to its own sample.
/// </summary>
public sealed record TokenRow(int[] InputIds, int[] Labels, int[] PositionIds, int[] Segments)
{
    /// <summary>Number of samples packed into the row.</summary>
    public int SampleCount => Segments.Length == 0 ? 0 : Segments.Max() + 1;

    /// <summary>A row holding one sample.</summary>
    public static TokenRow Single(EncodedSample s) =>
        new(s.InputIds, s.Labels, Enumerable.Range(0, s.InputIds.Length).ToArray(), new int[s.InputIds.Length]);

    /// <summary>Targets after the causal shift: positions 1..T−1 whose label is not ignored.</summary>
    public int ShiftedTargetCount
    {
        get
        {
            int n = 0;
            for (int i = 1; i < Labels.Length; i++) if (Labels[i] != EncodedSample.CausalLmLossIgnore) n++;
            return n;
        }
    }
}
