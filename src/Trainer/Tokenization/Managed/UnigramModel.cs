using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// The Unigram model of tokenizer.json (SentencePiece unigram) as Hugging Face tokenizers runs it: the Viterbi path of
/// highest total score over the pieces that match at each position (a character no piece covers is the unknown token,
/// scored lowest score − 10), consecutive unknowns fused into one piece, which byte_fallback then writes as &lt;0xNN&gt;
/// tokens when all its bytes have one. Words under 256 characters are cached. One known difference: the native library
/// parses scores with serde_json's best-effort float parsing, which can be a last bit off for numbers of more than about
/// 15 significant digits, so two paths of exactly equal score (sums of the same pieces in another order) may be
/// broken differently there; scores of up to 15 significant digits parse alike.
/// </summary>
internal sealed class UnigramModel : ITokenizerModel
{
    private const double UnkPenalty = 10.0;
    private const int CacheLimit = 200_000, MaxCachedLength = 256;
    private readonly (string Piece, double Score)[] _pieces;
    private readonly Dictionary<string, int> _ids;
    private readonly int? _unkId;
    private readonly bool _byteFallback;
    private readonly double _unkScore;
    // Trie over UTF-16 units: (node << 16 | unit) → child node; _terminal[node] = id of the piece ending there, or -1.
    private readonly Dictionary<long, int> _children = [];
    private readonly List<int> _terminal = [-1];
    private readonly ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);
    private int _cacheCount;

    private UnigramModel((string, double)[] pieces, int? unkId, bool byteFallback)
    {
        _pieces = pieces;
        _unkId = unkId;
        _byteFallback = byteFallback;
        _ids = new Dictionary<string, int>(pieces.Length, StringComparer.Ordinal);
        double min = double.PositiveInfinity;
        for (int id = 0; id < pieces.Length; id++)
        {
            var (piece, score) = pieces[id];
            _ids[piece] = id; // a repeated piece keeps its last id, as tokenizers' map does
            min = Math.Min(min, score);
            int node = 0;
            foreach (var unit in piece)
            {
                long key = ((long)node << 16) | unit;
                if (!_children.TryGetValue(key, out var child))
                {
                    child = _terminal.Count;
                    _terminal.Add(-1);
                    _children[key] = child;
                }
                node = child;
            }
            if (piece.Length > 0)
                _terminal[node] = 1;
        }
        // Ids of the trie's pieces: the map's (last) id of each string.
        foreach (var (piece, id) in _ids)
        {
            if (piece.Length > 0)
                _terminal[Walk(piece)] = id;
        }
        _unkScore = min - UnkPenalty;
    }

    public IReadOnlyDictionary<string, int> Vocabulary => _ids;

    public int VocabSize => _pieces.Length;

    public string? IdToToken(int id) => id >= 0 && id < _pieces.Length ? _pieces[id].Piece : null;

    /// <summary>Reads a "model" section of type Unigram: "vocab" [[piece, score], ...], "unk_id", "byte_fallback".</summary>
    public static UnigramModel From(JsonObject model, string source)
    {
        if (model["vocab"] is not JsonArray list)
            throw new InvalidDataException($"{source}: tokenizer.json's Unigram model has no \"vocab\" list.");
        var pieces = new (string, double)[list.Count];
        for (int i = 0; i < list.Count; i++)
        {
            if (list[i] is not JsonArray { Count: 2 } pair || pair[0] is not JsonValue p || !p.TryGetValue<string>(out var piece)
                || pair[1] is not JsonValue s || !s.TryGetValue<double>(out var score))
                throw new InvalidDataException($"{source}: tokenizer.json's Unigram vocab entry #{i} is not [piece, score].");
            pieces[i] = (piece, score);
        }
        int? unkId = model["unk_id"] is JsonValue u && u.TryGetValue<int>(out var unk) ? unk : null;
        if (unkId is int k && (k < 0 || k >= pieces.Length))
            throw new InvalidDataException($"{source}: tokenizer.json's Unigram unk_id {k} is outside its vocabulary (0..{pieces.Length - 1}).");
        return new UnigramModel(pieces, unkId, TokenizerJson.Bool(model, "byte_fallback", false));
    }

    public void Tokenize(string word, List<int> ids)
    {
        if (word.Length == 0)
            return;
        if (_cache.TryGetValue(word, out var cached))
        {
            ids.AddRange(cached);
            return;
        }
        var result = Encode(word);
        if (word.Length < MaxCachedLength && Volatile.Read(ref _cacheCount) < CacheLimit && _cache.TryAdd(word, result))
            Interlocked.Increment(ref _cacheCount);
        ids.AddRange(result);
    }

    private int Walk(string piece)
    {
        int node = 0;
        foreach (var unit in piece)
            node = _children[((long)node << 16) | unit];
        return node;
    }

    // tokenizers' encode_optimized, then tokenize's id lookup with byte fallback.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private int[] Encode(string s)
    {
        int size = s.Length;
        var score = new double[size + 1];
        var from = new int[size + 1];
        var id = new int[size + 1];
        Array.Fill(from, -1);
        for (int start = 0; start < size;)
        {
            int width = char.IsHighSurrogate(s[start]) && start + 1 < size && char.IsLowSurrogate(s[start + 1]) ? 2 : 1;
            double here = score[start];
            bool single = false;
            int node = 0;
            for (int end = start; end < size; end++)
            {
                if (!_children.TryGetValue(((long)node << 16) | s[end], out node))
                    break;
                int piece = _terminal[node];
                if (piece < 0)
                    continue;
                int keyPos = end + 1;
                double candidate = _pieces[piece].Score + here;
                if (from[keyPos] < 0 || candidate > score[keyPos])
                {
                    score[keyPos] = candidate;
                    from[keyPos] = start;
                    id[keyPos] = piece;
                }
                if (keyPos - start == width)
                    single = true;
            }
            if (!single)
            {
                int keyPos = start + width;
                double candidate = _unkScore + here;
                if (from[keyPos] < 0 || candidate > score[keyPos])
                {
                    score[keyPos] = candidate;
                    from[keyPos] = start;
                    id[keyPos] = _unkId ?? throw new InvalidOperationException("the Unigram model has no unk_id, and a character is in none of its pieces");
                }
            }
            start += width;
        }
        // Back from the end: the path's pieces, consecutive unknowns fused into one string.
        var pieces = new List<(int Start, int End, bool Unk)>();
        for (int end = size; end > 0;)
        {
            int start = from[end];
            bool unk = _unkId is int u && id[end] == u;
            if (unk && pieces.Count > 0 && pieces[^1].Unk)
                pieces[^1] = (start, pieces[^1].End, true);
            else
                pieces.Add((start, end, unk));
            end = start;
        }
        pieces.Reverse();
        var result = new List<int>(pieces.Count);
        foreach (var (start, end, _) in pieces)
        {
            var text = s[start..end];
            if (_ids.TryGetValue(text, out var tokenId))
            {
                result.Add(tokenId);
                continue;
            }
            if (_byteFallback)
            {
                var bytes = Encoding.UTF8.GetBytes(text);
                var byteIds = new int[bytes.Length];
                bool all = true;
                for (int i = 0; i < bytes.Length && all; i++)
                    all = _ids.TryGetValue($"<0x{bytes[i]:X2}>", out byteIds[i]);
                if (all)
                {
                    result.AddRange(byteIds);
                    continue;
                }
            }
            result.Add(_unkId ?? throw new InvalidOperationException("the Unigram model has no unk_id, and a character is in none of its pieces"));
        }
        return [.. result];
    }
}
