using System.Collections.Concurrent;
using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// The BPE model of tokenizer.json as Hugging Face tokenizers runs it: each character of a word starts as its vocabulary
/// id (or its UTF-8 bytes' &lt;0xNN&gt; ids with byte_fallback, else the unknown token, fused when fuse_unk), then the
/// lowest-ranked merge (leftmost on ties) is applied until none applies, with a priority queue over adjacent pairs.
/// ignore_merges (Llama 3) takes a word that is itself in the vocabulary whole. Words are cached.
/// </summary>
internal sealed class BpeModel
{
    private const int CacheLimit = 200_000;
    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _lookup;
    private readonly Dictionary<long, (int Rank, int NewId)> _merges;
    private readonly int[] _byteIds = new int[256];
    private readonly string? _unkToken;
    private readonly int? _unkId;
    private readonly string? _prefix;
    private readonly string? _suffix;
    private readonly bool _fuseUnk;
    private readonly bool _byteFallback;
    private readonly bool _ignoreMerges;
    private readonly ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);

    private BpeModel(Dictionary<string, int> vocab, Dictionary<long, (int, int)> merges, string? unkToken, string? prefix, string? suffix, bool fuseUnk, bool byteFallback, bool ignoreMerges)
    {
        _vocab = vocab;
        _lookup = vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        _merges = merges;
        (_unkToken, _prefix, _suffix, _fuseUnk, _byteFallback, _ignoreMerges) = (unkToken, prefix, suffix, fuseUnk, byteFallback, ignoreMerges);
        _unkId = unkToken is not null && vocab.TryGetValue(unkToken, out var u) ? u : null;
        for (int b = 0; b < 256; b++)
            _byteIds[b] = vocab.TryGetValue($"<0x{b:X2}>", out var id) ? id : -1;
    }

    /// <summary>The model's vocabulary: token string → id.</summary>
    public IReadOnlyDictionary<string, int> Vocabulary => _vocab;

    /// <summary>Reads a "model" section of type BPE.</summary>
    public static BpeModel From(JsonObject model, string source)
    {
        if (model["dropout"] is JsonValue d && d.TryGetValue<double>(out var dropout) && dropout > 0)
            throw new NotSupportedException($"{source}: tokenizer.json's BPE model has dropout {dropout}: BPE dropout is random and for training a tokenizer only; set it to null.");
        if (model["vocab"] is not JsonObject vocabNode)
            throw new InvalidDataException($"{source}: tokenizer.json's BPE model has no \"vocab\" object.");
        var vocab = new Dictionary<string, int>(vocabNode.Count, StringComparer.Ordinal);
        foreach (var (token, value) in vocabNode)
        {
            if (value is not JsonValue v || !v.TryGetValue<int>(out var id))
                throw new InvalidDataException($"{source}: tokenizer.json's vocab entry '{token}' has no integer id.");
            vocab[token] = id;
        }
        var prefix = TokenizerJson.OptionalString(model, "continuing_subword_prefix");
        var suffix = TokenizerJson.OptionalString(model, "end_of_word_suffix");
        var merges = new Dictionary<long, (int, int)>();
        if (model["merges"] is JsonArray list)
        {
            int rank = 0;
            foreach (var entry in list)
            {
                string a, b;
                if (entry is JsonValue sv && sv.TryGetValue<string>(out var line))
                {
                    int space = line.IndexOf(' ', StringComparison.Ordinal);
                    if (space < 0 || line.IndexOf(' ', space + 1) >= 0)
                        throw new InvalidDataException($"{source}: tokenizer.json's merge '{line}' is not two tokens separated by one space.");
                    (a, b) = (line[..space], line[(space + 1)..]);
                }
                else if (entry is JsonArray pair && pair.Count == 2 && pair[0] is JsonValue p0 && p0.TryGetValue<string>(out var s0) && pair[1] is JsonValue p1 && p1.TryGetValue<string>(out var s1))
                    (a, b) = (s0, s1);
                else
                    throw new InvalidDataException($"{source}: tokenizer.json's merge #{rank} is neither \"a b\" nor [\"a\", \"b\"].");
                if (!vocab.TryGetValue(a, out var aId) || !vocab.TryGetValue(b, out var bId))
                    throw new InvalidDataException($"{source}: tokenizer.json's merge '{a} {b}' names a token the vocabulary lacks.");
                var merged = a + (prefix is not null && b.StartsWith(prefix, StringComparison.Ordinal) ? b[prefix.Length..] : b);
                if (!vocab.TryGetValue(merged, out var newId))
                    throw new InvalidDataException($"{source}: tokenizer.json's merge '{a} {b}' makes '{merged}', which the vocabulary lacks.");
                merges[Key(aId, bId)] = (rank, newId); // a repeated pair keeps its last rank, as tokenizers' map does
                rank++;
            }
        }
        else if (model["merges"] is not null)
            throw new InvalidDataException($"{source}: tokenizer.json's BPE model has a \"merges\" that is not a list.");
        var unk = TokenizerJson.OptionalString(model, "unk_token");
        return new BpeModel(vocab, merges, unk, prefix, suffix, TokenizerJson.Bool(model, "fuse_unk", false),
            TokenizerJson.Bool(model, "byte_fallback", false), TokenizerJson.Bool(model, "ignore_merges", false));
    }

    private static long Key(int a, int b) => ((long)a << 32) | (uint)b;

    /// <summary>Appends the ids of one pre-tokenized word.</summary>
    public void Tokenize(string word, List<int> ids)
    {
        if (word.Length == 0)
            return;
        if (_ignoreMerges && _vocab.TryGetValue(word, out var whole))
        {
            ids.Add(whole);
            return;
        }
        if (!_cache.TryGetValue(word, out var cached))
        {
            cached = MergeWord(word);
            if (_cache.Count < CacheLimit)
                _cache.TryAdd(word, cached);
        }
        ids.AddRange(cached);
    }

    private int[] MergeWord(string word)
    {
        // Symbols: id, prev, next, and whether still alive (tokenizers' Word with len == 0 for merged-away symbols).
        var ids = new List<int>(word.Length);
        int pendingUnk = -1;
        Span<byte> utf8 = stackalloc byte[4];
        for (int i = 0; i < word.Length;)
        {
            int width = char.IsSurrogatePair(word, i) ? 2 : 1;
            bool first = i == 0, last = i + width == word.Length;
            var ch = word.AsSpan(i, width);
            int id;
            bool found;
            if ((!first && _prefix is not null) || (last && _suffix is not null))
            {
                var s = string.Concat(!first && _prefix is not null ? _prefix : "", ch, last && _suffix is not null ? _suffix : "");
                found = _vocab.TryGetValue(s, out id);
                if (!found && _byteFallback && TryBytes(Encoding.UTF8.GetBytes(s), ids))
                {
                    i += width;
                    continue;
                }
            }
            else
            {
                found = _lookup.TryGetValue(ch, out id);
                if (!found && _byteFallback)
                {
                    int n = Encoding.UTF8.GetBytes(ch, utf8);
                    if (TryBytes(utf8[..n], ids))
                    {
                        i += width;
                        continue;
                    }
                }
            }
            if (found)
            {
                if (pendingUnk >= 0)
                {
                    ids.Add(pendingUnk);
                    pendingUnk = -1;
                }
                ids.Add(id);
            }
            else if (_unkToken is not null)
            {
                int unk = _unkId ?? throw new InvalidOperationException($"the BPE unk_token '{_unkToken}' is not in the vocabulary, and '{ch}' needs it");
                // A run of unknown characters is one unk with fuse_unk, else one unk each.
                if (pendingUnk >= 0 && !_fuseUnk)
                    ids.Add(pendingUnk);
                pendingUnk = unk;
            }
            // No unk token: the character is dropped, as tokenizers drops it.
            i += width;
        }
        if (pendingUnk >= 0)
            ids.Add(pendingUnk);
        return MergeAll(ids);
    }

    private bool TryBytes(ReadOnlySpan<byte> bytes, List<int> ids)
    {
        foreach (var b in bytes)
        {
            if (_byteIds[b] < 0)
                return false;
        }
        // A pending unknown token is not written first: tokenizers adds it after these bytes, at the next known character.
        foreach (var b in bytes)
            ids.Add(_byteIds[b]);
        return true;
    }

    // tokenizers' Word::merge_all: a min-queue of (rank, position) over adjacent pairs; stale entries are skipped.
    private int[] MergeAll(List<int> start)
    {
        int n = start.Count;
        if (n < 2 || _merges.Count == 0)
            return [.. start];
        var c = start.ToArray();
        var prev = new int[n];
        var next = new int[n];
        var alive = new bool[n];
        for (int i = 0; i < n; i++)
        {
            prev[i] = i - 1;
            next[i] = i + 1 < n ? i + 1 : -1;
            alive[i] = true;
        }
        var queue = new PriorityQueue<(int Pos, int NewId), long>(n);
        for (int i = 0; i + 1 < n; i++)
        {
            if (_merges.TryGetValue(Key(c[i], c[i + 1]), out var m))
                queue.Enqueue((i, m.NewId), Priority(m.Rank, i));
        }
        while (queue.TryDequeue(out var top, out _))
        {
            int pos = top.Pos;
            if (!alive[pos] || next[pos] < 0)
                continue;
            int right = next[pos];
            if (!_merges.TryGetValue(Key(c[pos], c[right]), out var current) || current.NewId != top.NewId)
                continue;
            c[pos] = top.NewId;
            alive[right] = false;
            next[pos] = next[right];
            if (next[right] >= 0)
                prev[next[right]] = pos;
            if (prev[pos] >= 0 && _merges.TryGetValue(Key(c[prev[pos]], c[pos]), out var left))
                queue.Enqueue((prev[pos], left.NewId), Priority(left.Rank, prev[pos]));
            if (next[pos] >= 0 && _merges.TryGetValue(Key(c[pos], c[next[pos]]), out var after))
                queue.Enqueue((pos, after.NewId), Priority(after.Rank, pos));
        }
        var result = new List<int>(n);
        for (int i = 0; i < n; i++)
        {
            if (alive[i])
                result.Add(c[i]);
        }
        return [.. result];
    }

    private static long Priority(int rank, int pos) => ((long)rank << 32) | (uint)pos;
}
