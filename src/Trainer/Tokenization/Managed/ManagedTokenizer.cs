using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// tokenizer.json in managed code, for every OS: added tokens split out of the text, normalizer, pre-tokenizer, BPE
/// model, post-processor and decoder, each following Hugging Face tokenizers (0.22) step by step so ids equal the
/// native library's (a differential test checks this on Linux). Microsoft.ML.Tokenizers' BpeTokenizer is not used: it
/// has no equivalent of tokenizers' split behaviours, Metaspace prepend schemes, added-token flags or byte-fallback/unk
/// ordering, and ids must match exactly. Models other than BPE (WordPiece, WordLevel, Unigram) are refused.
/// </summary>
internal sealed class ManagedTokenizer : ITokenizerEngine
{
    private readonly AddedTokens _added;
    private readonly TokenizerNormalizer? _normalizer;
    private readonly PreTokenizer? _preTokenizer;
    private readonly BpeModel _model;
    private readonly PostProcessor? _postProcessor;
    private readonly TokenizerDecoder? _decoder;
    private readonly Dictionary<int, AddedToken> _addedById = [];
    private readonly string?[] _modelTokens;
    private readonly string _source;
    private readonly HashSet<string> _specialContents = new(StringComparer.Ordinal);

    /// <summary>Builds the pipeline from a parsed tokenizer.json.</summary>
    /// <exception cref="InvalidDataException">A section is malformed.</exception>
    /// <exception cref="NotSupportedException">A component (or a model other than BPE) the managed tokenizer does not implement.</exception>
    public ManagedTokenizer(JsonObject root, string source)
    {
        _source = source;
        var model = root["model"] as JsonObject ?? throw new InvalidDataException($"{source}: tokenizer.json has no \"model\" section.");
        var type = TokenizerJson.OptionalString(model, "type") ?? (model["merges"] is not null ? "BPE" : "unknown");
        if (type != "BPE")
            throw TokenizerJson.Unsupported("model", type, source);
        _model = BpeModel.From(model, source);
        _normalizer = TokenizerNormalizer.From(root["normalizer"], source);
        _preTokenizer = PreTokenizer.From(root["pre_tokenizer"], source);
        _postProcessor = PostProcessor.From(root["post_processor"], source);
        _decoder = TokenizerDecoder.From(root["decoder"], source);
        var added = AssignIds(AddedTokens.Read(root["added_tokens"], source), _model);
        _added = new AddedTokens(added, _normalizer);
        foreach (var t in added)
        {
            _addedById[t.Id] = t;
            if (t.Special)
                _specialContents.Add(t.Content);
        }
        int size = _model.Vocabulary.Count == 0 ? 0 : _model.Vocabulary.Values.Max() + 1;
        _modelTokens = new string?[size];
        foreach (var (token, id) in _model.Vocabulary)
        {
            if (id >= 0)
                _modelTokens[id] = token;
        }
    }

    public TokenizerImplementation Implementation => TokenizerImplementation.Managed;

    public int[] Encode(string text, bool addSpecialTokens)
    {
        RefuseLoneSurrogates(text);
        var ids = new List<int>();
        var pieces = new List<(TextPiece Piece, int TokenId)>();
        _added.Split(text, pieces);
        var words = new List<TextPiece>();
        foreach (var (piece, tokenId) in pieces)
        {
            if (tokenId >= 0)
            {
                ids.Add(tokenId);
                continue;
            }
            words.Clear();
            if (_preTokenizer is null)
                words.Add(piece);
            else
                _preTokenizer.Split(piece, words);
            try
            {
                foreach (var w in words)
                    _model.Tokenize(w.Text, ids);
            }
            catch (InvalidOperationException e)
            {
                throw new InvalidOperationException($"{_source}: encoding failed: {e.Message}", e);
            }
        }
        if (addSpecialTokens && _postProcessor is not null)
            ids = _postProcessor.Process(ids);
        return [.. ids];
    }

    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens)
    {
        var tokens = new List<string>(ids.Count);
        foreach (var id in ids)
        {
            var token = _addedById.TryGetValue(id, out var added) ? added.Content
                : id >= 0 && id < _modelTokens.Length ? _modelTokens[id] : null;
            // tokenizers skips by content: any token whose string is a special token's.
            if (token is not null && !(skipSpecialTokens && _specialContents.Contains(token)))
                tokens.Add(token);
        }
        return _decoder is null ? string.Join(' ', tokens) : string.Concat(_decoder.DecodeChain(tokens));
    }

    public void Dispose()
    {
    }

    // tokenizers does not take added tokens' ids from the file: AddedVocabulary.add_tokens gives each the id of the same
    // string (added earlier, or in the model's vocabulary), else the next id after the model's vocabulary size (its entry
    // count) and the added ones. Real files agree with their own ids; this keeps odd ones equal to the native library.
    private static List<AddedToken> AssignIds(List<AddedToken> tokens, BpeModel model)
    {
        var ids = new Dictionary<string, int>(StringComparer.Ordinal);
        int vocabSize = model.Vocabulary.Count, maxAdded = -1;
        var result = new List<AddedToken>(tokens.Count);
        foreach (var t in tokens)
        {
            // An empty token, or one already added (AddedToken equality is by content), is ignored.
            if (t.Content.Length == 0 || ids.ContainsKey(t.Content))
                continue;
            if (!model.Vocabulary.TryGetValue(t.Content, out var id))
                id = maxAdded < 0 ? vocabSize : maxAdded >= vocabSize || vocabSize == 0 ? maxAdded + 1 : vocabSize;
            ids[t.Content] = id;
            maxAdded = Math.Max(maxAdded, id);
            result.Add(t with { Id = id });
        }
        return result;
    }

    // Rust strings cannot hold a lone surrogate: the native library refuses such text, and so does this one, naming where.
    private void RefuseLoneSurrogates(string text)
    {
        for (int i = 0; i < text.Length; i++)
        {
            if (!char.IsSurrogate(text[i]))
                continue;
            if (char.IsSurrogatePair(text, i))
                i++;
            else
                throw new InvalidOperationException($"{_source}: encoding failed: the text is not valid Unicode: a lone UTF-16 surrogate U+{(int)text[i]:X4} at index {i}");
        }
    }
}
