namespace QLora.Trainer;

/// <summary>A rendered conversation as token ids, with which positions are assistant output (trained) and which are prompt (masked).</summary>
/// <param name="InputIds">Token ids of the whole rendered text.</param>
/// <param name="Trainable">Per position: true for tokens of assistant answers and their end-of-turn marker.</param>
public sealed record TokenizedChat(int[] InputIds, bool[] Trainable)
{
    /// <summary>The label value Hugging Face losses ignore (PyTorch cross_entropy's default ignore_index).</summary>
    public const int IgnoreIndex = -100;

    /// <summary>Labels for causal-LM training: the token id where <see cref="Trainable"/>, else <paramref name="ignoreIndex"/>. Not shifted (the model shifts, as in transformers).</summary>
    public int[] Labels(int ignoreIndex = IgnoreIndex)
    {
        var labels = new int[InputIds.Length];
        for (int i = 0; i < labels.Length; i++)
            labels[i] = Trainable[i] ? InputIds[i] : ignoreIndex;
        return labels;
    }
}
