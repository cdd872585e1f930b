namespace QLora.Trainer;

/// <summary>The model step of tokenizer.json: one pre-tokenized word to ids (BPE or Unigram).</summary>
internal interface ITokenizerModel
{
    /// <summary>Token string → id.</summary>
    IReadOnlyDictionary<string, int> Vocabulary { get; }

    /// <summary>tokenizers' get_vocab_size: the number of vocabulary entries (the first id added tokens may take).</summary>
    int VocabSize { get; }

    /// <summary>The token string of an id, or null.</summary>
    string? IdToToken(int id);

    /// <summary>Appends the ids of one word.</summary>
    void Tokenize(string word, List<int> ids);
}
