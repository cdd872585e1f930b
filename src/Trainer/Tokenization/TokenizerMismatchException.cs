namespace QLora.Trainer;

/// <summary>
/// Thrown when a tokenizer cannot belong to a model: it produces token ids the model's embedding has no row for.
/// Training on such ids would read out of bounds (or silently wrong rows), so the job stops before it starts.
/// </summary>
public sealed class TokenizerMismatchException : Exception
{
    /// <summary>Creates the exception with a message that says what differs and what to do.</summary>
    public TokenizerMismatchException(string message) : base(message) { }

    /// <summary>Token count of the tokenizer (highest id + 1).</summary>
    public int TokenizerVocabSize { get; init; }

    /// <summary>Row count of the model's token embedding.</summary>
    public int EmbeddingRows { get; init; }
}
