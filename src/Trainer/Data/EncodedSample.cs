namespace QLora.Trainer;

/// <summary>A sample as token ids and labels (−100 where no loss is computed); labels are not shifted.</summary>
/// <param name="InputIds">Token ids.</param>
/// <param name="Labels">Per position the target id, or −100.</param>
/// <param name="Truncated">Whether the sample was cut to the maximum sequence length.</param>
public sealed record EncodedSample(int[] InputIds, int[] Labels, bool Truncated)
{
    /// <summary>
    /// Whether the sample's text was cut to what <see cref="SampleEncoder.MaxTextChars"/> allows before tokenizing (its
    /// first tokens, and so the truncated row, are those of the whole text).
    /// </summary>
    public bool CutBeforeTokenizing { get; init; }

    /// <summary>Positions whose label is a target (what the loss averages over, before the shift).</summary>
    public int TargetCount => Labels.Count(l => l != CausalLmLossIgnore);

    internal const int CausalLmLossIgnore = (int)CausalLmLoss.IgnoreIndex;
}
