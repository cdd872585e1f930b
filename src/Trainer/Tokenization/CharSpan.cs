namespace QLora.Trainer;

/// <summary>A half-open range of characters [Start, Start + Length) in a rendered string.</summary>
/// <param name="Start">Index of the first character.</param>
/// <param name="Length">Number of characters.</param>
public readonly record struct CharSpan(int Start, int Length)
{
    /// <summary>Index one past the last character.</summary>
    public int End => Start + Length;
}
