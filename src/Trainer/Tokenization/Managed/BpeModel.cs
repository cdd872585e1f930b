using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// The BPE model of tokenizer.json as Hugging Face tokenizers runs it: each character of a word starts as its vocabulary
/// id (or its UTF-8 bytes' &lt;0xNN&gt; ids with byte_fallback, else the unknown token, fused when fuse_unk), then the
/// lowest-ranked merge (leftmost on ties) is applied until none applies, with a priority queue over adjacent pairs.
/// ignore_merges (Llama 3) takes a word that is itself in the vocabulary whole. Words are cached.
/// </summary>
internal sealed class BpeModel : ITokenizerModel
{
    private const int CacheLimit = 200_000;
    private const int MaxCachedLength = 256;
    private int _cacheCount;
    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _lookup;
    private readonly MergeTable _merges;
    private readonly int[] _byteIds = new int[256];
    private readonly int[] _charIds = new int[0x3000]; // ids of single characters below U+3000, -1 when not in the vocabulary
    private readonly string? _unkToken;
    private readonly int? _unkId;
    private readonly string? _prefix;
    private readonly string? _suffix;
    private readonly bool _fuseUnk;
    private readonly bool _byteFallback;
    private readonly bool _ignoreMerges;
    private readonly string?[] _idToToken;
    private readonly ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);

    private BpeModel(Dictionary<string, int> vocab, Dictionary<long, (int, int)> merges, string? unkToken, string? prefix, string? suffix, bool fuseUnk, bool byteFallback, bool ignoreMerges)
    {
        _vocab = vocab;
        _lookup = vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        _merges = new MergeTable(merges);
        (_unkToken, _prefix, _suffix, _fuseUnk, _byteFallback, _ignoreMerges) = (unkToken, prefix, suffix, fuseUnk, byteFallback, ignoreMerges);
        _unkId = unkToken is not null && vocab.TryGetValue(unkToken, out var u) ? u : null;
        _idToToken = new string?[vocab.Count == 0 ? 0 : vocab.Values.Max() + 1];
        foreach (var (token, tokenId) in vocab)
        {
            if (tokenId >= 0)
                _idToToken[tokenId] = token;
        }
        for (int b = 0; b < 256; b++)
            _byteIds[b] = vocab.TryGetValue($"<0x{b:X2}>", out var id) ? id : -1;
        for (int ch = 0; ch < _charIds.Length; ch++)
            _charIds[ch] = char.IsSurrogate((char)ch) || !vocab.TryGetValue(((char)ch).ToString(), out var cid) ? -1 : cid;
    }

    /// <summary>The model's vocabulary: token string → id.</summary>
    public IReadOnlyDictionary<string, int> Vocabulary => _vocab;

    public int VocabSize => _vocab.Count;

    public string? IdToToken(int id) => id >= 0 && id < _idToToken.Length ? _idToToken[id] : null;

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
            if (id < 0)
                throw new InvalidDataException($"{source}: tokenizer.json's vocab entry '{token}' has a negative id.");
            vocab[token] = id;
        }
        var prefix = TokenizerJson.OptionalString(model, "continuing_subword_prefix");
        var suffix = TokenizerJson.OptionalString(model, "end_of_word_suffix");
        var merges = new Dictionary<long, (int, int)>(PairComparer.Instance);
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

    /// <summary>
    /// The merges as an open-addressing table of (left id, right id) → (rank, merged id): the lookup BPE does for every
    /// adjacent pair, without Dictionary's comparer calls.
    /// </summary>
    private sealed class MergeTable
    {
        private readonly long[] _keys;
        private readonly int[] _ranks;
        private readonly int[] _newIds;
        private readonly int _mask;

        public MergeTable(Dictionary<long, (int Rank, int NewId)> merges)
        {
            Count = merges.Count;
            int capacity = 16;
            while (capacity < merges.Count * 2)
                capacity <<= 1;
            _keys = new long[capacity];
            Array.Fill(_keys, -1L); // keys are non-negative: ids are
            _ranks = new int[capacity];
            _newIds = new int[capacity];
            _mask = capacity - 1;
            foreach (var (key, (rank, newId)) in merges)
            {
                int h = PairComparer.Mix(key) & _mask;
                while (_keys[h] != -1L)
                    h = (h + 1) & _mask;
                (_keys[h], _ranks[h], _newIds[h]) = (key, rank, newId);
            }
        }

        public int Count { get; }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public bool TryGetValue(long key, out (int Rank, int NewId) value)
        {
            int h = PairComparer.Mix(key) & _mask;
            while (true)
            {
                long k = _keys[h];
                if (k == key)
                {
                    value = (_ranks[h], _newIds[h]);
                    return true;
                }
                if (k == -1L)
                {
                    value = default;
                    return false;
                }
                h = (h + 1) & _mask;
            }
        }
    }

    // long.GetHashCode is high ^ low, so pairs (a, b) with equal a ^ b would share a bucket: mix the bits instead.
    private sealed class PairComparer : IEqualityComparer<long>
    {
        public static readonly PairComparer Instance = new();

        public bool Equals(long x, long y) => x == y;

        public int GetHashCode(long key) => Mix(key);

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int Mix(long key)
        {
            ulong h = (ulong)key;
            h ^= h >> 33;
            h *= 0xff51afd7ed558ccdUL;
            h ^= h >> 33;
            return (int)h;
        }
    }

    /// <summary>Appends the ids of one pre-tokenized word.</summary>
    public void Tokenize(string word, List<int> ids)
    {
        if (word.Length == 0)
            return;
        if (_ignoreMerges && _lookup.TryGetValue(word, out var whole))
        {
            ids.Add(whole);
            return;
        }
        if (_cache.TryGetValue(word, out var cached))
        {
            ids.AddRange(cached);
            return;
        }
        var merged = MergeWord(word);
        // Like tokenizers, only words under 256 characters are cached (SentencePiece-style files without a pre-tokenizer
        // make whole texts "words"); the cache stops growing at its limit.
        if (word.Length < MaxCachedLength && Volatile.Read(ref _cacheCount) < CacheLimit && _cache.TryAdd(word, merged))
            Interlocked.Increment(ref _cacheCount);
        ids.AddRange(merged);
    }

    // Hot loops: compiled fully optimized at once, since tiered compilation's slow first tier would run the whole first pass over a corpus.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private int[] MergeWord(string word)
    {
        var symbols = new List<int>(word.Length);
        int pendingUnk = -1;
        Span<byte> utf8 = stackalloc byte[4];
        for (int i = 0; i < word.Length;)
        {
            int width = char.IsHighSurrogate(word[i]) && i + 1 < word.Length && char.IsLowSurrogate(word[i + 1]) ? 2 : 1;
            bool first = i == 0, last = i + width == word.Length;
            var ch = word.AsSpan(i, width);
            int id;
            bool found;
            if ((!first && _prefix is not null) || (last && _suffix is not null))
            {
                var s = string.Concat(!first && _prefix is not null ? _prefix : "", ch, last && _suffix is not null ? _suffix : "");
                found = _vocab.TryGetValue(s, out id);
                if (!found && _byteFallback && TryBytes(Encoding.UTF8.GetBytes(s), symbols))
                {
                    i += width;
                    continue;
                }
            }
            else
            {
                found = width == 1 && ch[0] < _charIds.Length ? (id = _charIds[ch[0]]) >= 0 : _lookup.TryGetValue(ch, out id);
                if (!found && _byteFallback)
                {
                    int n = Encoding.UTF8.GetBytes(ch, utf8);
                    if (TryBytes(utf8[..n], symbols))
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
                    symbols.Add(pendingUnk);
                    pendingUnk = -1;
                }
                symbols.Add(id);
            }
            else if (_unkToken is not null)
            {
                int unk = _unkId ?? throw new InvalidOperationException($"the BPE unk_token '{_unkToken}' is not in the vocabulary, and '{ch}' needs it");
                // A run of unknown characters is one unk with fuse_unk, else one unk each.
                if (pendingUnk >= 0 && !_fuseUnk)
                    symbols.Add(pendingUnk);
                pendingUnk = unk;
            }
            // No unk token: the character is dropped, as tokenizers drops it.
            i += width;
        }
        if (pendingUnk >= 0)
            symbols.Add(pendingUnk);
        return MergeAll(symbols);
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

    // tokenizers' Word::merge_all: a min-heap of (rank, position) over adjacent pairs, lowest rank first and the leftmost
    // on ties; an entry whose pair has changed since it was pushed is skipped.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
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
        // Heap entries: priority (rank << 32 | pos) and the merged id expected.
        var heap = new (long Priority, int NewId)[Math.Max(4, 3 * n)];
        int size = 0;
        for (int i = 0; i + 1 < n; i++)
        {
            if (_merges.TryGetValue(Key(c[i], c[i + 1]), out var m))
                Push(heap, ref size, Priority(m.Rank, i), m.NewId);
        }
        int remaining = n;
        while (size > 0)
        {
            var (priority, newId) = heap[0];
            heap[0] = heap[--size];
            SiftDown(heap, size);
            int pos = (int)(priority & 0xFFFFFFFF);
            if (!alive[pos] || next[pos] < 0)
                continue;
            int right = next[pos];
            if (!_merges.TryGetValue(Key(c[pos], c[right]), out var current) || current.NewId != newId)
                continue;
            c[pos] = newId;
            alive[right] = false;
            remaining--;
            next[pos] = next[right];
            if (next[right] >= 0)
                prev[next[right]] = pos;
            if (size + 2 > heap.Length)
                Array.Resize(ref heap, heap.Length * 2);
            if (prev[pos] >= 0 && _merges.TryGetValue(Key(c[prev[pos]], c[pos]), out var left))
                Push(heap, ref size, Priority(left.Rank, prev[pos]), left.NewId);
            if (next[pos] >= 0 && _merges.TryGetValue(Key(c[pos], c[next[pos]]), out var after))
                Push(heap, ref size, Priority(after.Rank, pos), after.NewId);
        }
        var result = new int[remaining];
        for (int i = 0, k = 0; i < n; i++)
        {
            if (alive[i])
                result[k++] = c[i];
        }
        return result;
    }

    private static void Push((long Priority, int NewId)[] heap, ref int size, long priority, int newId)
    {
        int i = size++;
        while (i > 0)
        {
            int parent = (i - 1) >> 1;
            if (heap[parent].Priority <= priority)
                break;
            heap[i] = heap[parent];
            i = parent;
        }
        heap[i] = (priority, newId);
    }

    private static void SiftDown((long Priority, int NewId)[] heap, int size)
    {
        if (size == 0)
            return;
        var item = heap[0];
        int i = 0;
        while (true)
        {
            int child = 2 * i + 1;
            if (child >= size)
                break;
            if (child + 1 < size && heap[child + 1].Priority < heap[child].Priority)
                child++;
            if (heap[child].Priority >= item.Priority)
                break;
            heap[i] = heap[child];
            i = child;
        }
        heap[i] = item;
    }

    private static long Priority(int rank, int pos) => ((long)rank << 32) | (uint)pos;
}
