namespace QLora.Trainer;

/// <summary>
/// What turns text into ids and back behind <see cref="HfTokenizer"/>: Hugging Face's Rust library (native, linux-x64)
/// or the managed implementation of tokenizer.json. Ids are checked against the vocabulary before they get here.
/// </summary>
internal interface ITokenizerEngine : IDisposable
{
    /// <summary>Which implementation this is.</summary>
    TokenizerImplementation Implementation { get; }

    /// <summary>transformers' encode(text, add_special_tokens): added tokens split out, normalizer, pre-tokenizer, model, post-processor.</summary>
    int[] Encode(string text, bool addSpecialTokens);

    /// <summary>transformers' decode(ids, skip_special_tokens) before its Python-side clean-up.</summary>
    string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens);
}
