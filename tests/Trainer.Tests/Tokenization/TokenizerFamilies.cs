using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Trainer.Tests;

/// <summary>
/// tokenizer.json files of each family the managed tokenizer implements, built from GPT-2's real vocabulary and merges
/// (rebuilt from gpt2.tiktoken, no network): GPT-2 itself; Llama 3 style (Split regex with 3-digit groups, ByteLevel
/// without regex, ignore_merges, a BOS template, special tokens with lstrip/rstrip/single_word/normalized flags); Qwen2
/// style (NFC, single digits); Llama 2 style (Prepend+Replace normalizer, byte fallback, unk fused, the Replace/ByteFallback/
/// Fuse/Strip decoder) and Mistral style (Metaspace pre-tokenizer and decoder, prepend_scheme "first"), both over a
/// SentencePiece-style vocabulary derived from GPT-2's; and a few normalizer/pre-tokenizer variants (Lowercase+NFKC,
/// Digits, Punctuation, WhitespaceSplit, MergedWithPrevious/Next, Contiguous, invert).
/// </summary>
public sealed class TokenizerFamilies : IDisposable
{
    public const string Llama3Regex = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    public const string Qwen2Regex = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    private readonly string _root = TokenizerFixtures.NewFolder();

    public TokenizerFamilies()
    {
        var gpt2Folder = TokenizerFixtures.WriteGpt2Folder();
        try
        {
            var gpt2 = JsonNode.Parse(File.ReadAllText(Path.Combine(gpt2Folder, "tokenizer.json")))!.AsObject();
            var files = new Dictionary<string, string>
            {
                ["gpt2"] = Save("gpt2", gpt2),
                ["llama3"] = Save("llama3", Llama3(gpt2)),
                ["qwen2"] = Save("qwen2", Qwen2(gpt2)),
            };
            var sp = SentencePieceModel(gpt2);
            files["llama2"] = Save("llama2", Llama2(sp));
            files["mistral"] = Save("mistral", Mistral(sp));
            var v1 = Variant(gpt2, Normalizers(N("Lowercase"), N("NFKC")),
                PreTokenizers(new JsonObject { ["type"] = "Digits", ["individual_digits"] = true }, ByteLevelPre(addPrefixSpace: true, useRegex: true)));
            v1["added_tokens"] = new JsonArray(Added(50256, "<|endoftext|>"), Added(50257, "HeLLo Token", special: false, normalized: true), Added(50258, "ＡＢＣ", special: false, normalized: true));
            files["variants-lower-nfkc-digits"] = Save("v1", v1);
            files["variants-punct-ws"] = Save("v2", Variant(gpt2, N("NFD"),
                PreTokenizers(new JsonObject { ["type"] = "WhitespaceSplit" }, new JsonObject { ["type"] = "Punctuation", ["behavior"] = "Isolated" },
                    new JsonObject { ["type"] = "Digits", ["individual_digits"] = false }, ByteLevelPre(addPrefixSpace: false, useRegex: false))));
            files["variants-split-behaviours"] = Save("v3", Variant(gpt2, new JsonObject { ["type"] = "Strip", ["strip_left"] = true, ["strip_right"] = false },
                PreTokenizers(Split(@"\s+", "MergedWithPrevious"), Split("-", "MergedWithNext", literal: true), Split(@"\p{N}", "Contiguous"),
                    Split(@"[aeiou]", "Removed", invert: true), ByteLevelPre(addPrefixSpace: false, useRegex: true))));
            Files = files;
        }
        finally
        {
            TokenizerFixtures.DeleteFolder(gpt2Folder);
        }
    }

    /// <summary>Family name → tokenizer.json path.</summary>
    public IReadOnlyDictionary<string, string> Files { get; }

    public void Dispose() => TokenizerFixtures.DeleteFolder(_root);

    private string Save(string name, JsonObject root)
    {
        var dir = Path.Combine(_root, name);
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, "tokenizer.json");
        File.WriteAllText(path, root.ToJsonString());
        return path;
    }

    private static JsonObject N(string type) => new() { ["type"] = type };

    private static JsonObject Normalizers(params JsonNode[] steps) => new() { ["type"] = "Sequence", ["normalizers"] = new JsonArray(steps) };

    private static JsonObject PreTokenizers(params JsonNode[] steps) => new() { ["type"] = "Sequence", ["pretokenizers"] = new JsonArray(steps) };

    private static JsonObject ByteLevelPre(bool addPrefixSpace, bool useRegex) => new()
    {
        ["type"] = "ByteLevel", ["add_prefix_space"] = addPrefixSpace, ["trim_offsets"] = true, ["use_regex"] = useRegex,
    };

    private static JsonObject Split(string pattern, string behavior, bool literal = false, bool invert = false) => new()
    {
        ["type"] = "Split",
        ["pattern"] = new JsonObject { [literal ? "String" : "Regex"] = pattern },
        ["behavior"] = behavior,
        ["invert"] = invert,
    };

    private static JsonObject Added(int id, string content, bool special = true, bool lstrip = false, bool rstrip = false, bool singleWord = false, bool normalized = false) => new()
    {
        ["id"] = id, ["content"] = content, ["single_word"] = singleWord, ["lstrip"] = lstrip,
        ["rstrip"] = rstrip, ["normalized"] = normalized, ["special"] = special,
    };

    private static JsonObject Bos(string bos, int id) => new()
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
        ["special_tokens"] = new JsonObject { [bos] = new JsonObject { ["id"] = bos, ["ids"] = new JsonArray(id), ["tokens"] = new JsonArray(bos) } },
    };

    private static JsonObject Variant(JsonObject gpt2, JsonNode normalizer, JsonNode preTokenizer)
    {
        var root = (JsonObject)gpt2.DeepClone();
        root["normalizer"] = normalizer;
        root["pre_tokenizer"] = preTokenizer;
        return root;
    }

    // Llama 3: 50257.. are specials (as 128000.. there), some with the flags added tokens can carry.
    private static JsonObject Llama3(JsonObject gpt2)
    {
        var root = (JsonObject)gpt2.DeepClone();
        root["added_tokens"] = new JsonArray(
            Added(50256, "<|endoftext|>"), Added(50257, "<|begin_of_text|>"), Added(50258, "<|eot_id|>"),
            Added(50259, "<|start_header_id|>"), Added(50260, "<|end_header_id|>"),
            Added(50261, "<mask>", lstrip: true), Added(50262, "[SEP]", rstrip: true), Added(50263, "<|eot|>"),
            Added(50264, "qlora", special: false, singleWord: true), Added(50265, "Ölflasche", special: false, normalized: true));
        root["pre_tokenizer"] = PreTokenizers(Split(Llama3Regex, "Isolated"), ByteLevelPre(addPrefixSpace: false, useRegex: false));
        root["post_processor"] = new JsonObject
        {
            ["type"] = "Sequence",
            ["processors"] = new JsonArray(new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = false, ["use_regex"] = true }, Bos("<|begin_of_text|>", 50257)),
        };
        root["model"]!["ignore_merges"] = true;
        return root;
    }

    private static JsonObject Qwen2(JsonObject gpt2)
    {
        var root = (JsonObject)gpt2.DeepClone();
        root["added_tokens"] = new JsonArray(Added(50256, "<|endoftext|>"), Added(50257, "<|im_start|>"), Added(50258, "<|im_end|>"));
        root["normalizer"] = N("NFC");
        root["pre_tokenizer"] = PreTokenizers(Split(Qwen2Regex, "Isolated"), ByteLevelPre(addPrefixSpace: false, useRegex: false));
        return root;
    }

    /// <summary>A SentencePiece-style BPE model from GPT-2's: every token that is valid UTF-8 with ' ' written '▁', the merges among them, 256 byte-fallback pieces and &lt;unk&gt;.</summary>
    private static JsonObject SentencePieceModel(JsonObject gpt2)
    {
        var strict = new UTF8Encoding(false, true);
        var byteOf = new Dictionary<char, byte>();
        for (int b = 0; b < 256; b++)
            byteOf[TokenizerFixtures.ByteToUnicode[b][0]] = (byte)b;
        string? Text(string byteLevel)
        {
            var bytes = byteLevel.Select(c => byteOf[c]).ToArray();
            try { return strict.GetString(bytes).Replace(' ', '▁'); } catch (DecoderFallbackException) { return null; }
        }
        var vocab = new JsonObject { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2 };
        // Leave out a few bytes so that some characters have no fallback and become <unk>.
        for (int b = 0; b < 256; b++)
        {
            if (b is not (0xF0 or 0x9F))
                vocab[$"<0x{b:X2}>"] = 3 + b;
        }
        int next = 259;
        var gptVocab = gpt2["model"]!["vocab"]!.AsObject().OrderBy(kv => kv.Value!.GetValue<int>());
        var known = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (token, _) in gptVocab)
        {
            if (Text(token) is { } text && !text.Contains('\u0120') && text.Length > 0 && known.Add(text) && !vocab.ContainsKey(text))
                vocab[text] = next++;
        }
        var merges = new JsonArray();
        foreach (var m in gpt2["model"]!["merges"]!.AsArray())
        {
            var parts = m!.GetValue<string>().Split(' ');
            if (Text(parts[0]) is { } a && Text(parts[1]) is { } b && vocab.ContainsKey(a) && vocab.ContainsKey(b) && vocab.ContainsKey(a + b))
                merges.Add(new JsonArray(a, b));
        }
        return new JsonObject
        {
            ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = "<unk>", ["continuing_subword_prefix"] = null,
            ["end_of_word_suffix"] = null, ["fuse_unk"] = true, ["byte_fallback"] = true, ["ignore_merges"] = false,
            ["vocab"] = vocab, ["merges"] = merges,
        };
    }

    private static JsonArray SentencePieceAdded() => new(
        Added(0, "<unk>"), Added(1, "<s>"), Added(2, "</s>"));

    // Llama 2 (current transformers files): Prepend("▁") + Replace(" " → "▁"), no pre-tokenizer.
    private static JsonObject Llama2(JsonObject model) => new()
    {
        ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
        ["added_tokens"] = SentencePieceAdded(),
        ["normalizer"] = Normalizers(new JsonObject { ["type"] = "Prepend", ["prepend"] = "▁" },
            new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = " " }, ["content"] = "▁" }),
        ["pre_tokenizer"] = null,
        ["post_processor"] = Bos("<s>", 1),
        ["decoder"] = new JsonObject
        {
            ["type"] = "Sequence",
            ["decoders"] = new JsonArray(
                new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = "▁" }, ["content"] = " " },
                N("ByteFallback"), N("Fuse"),
                new JsonObject { ["type"] = "Strip", ["content"] = " ", ["start"] = 1, ["stop"] = 0 }),
        },
        ["model"] = model.DeepClone(),
    };

    // Mistral-style: Metaspace pre-tokenizer (prepend only at the start of the input, no split) and Metaspace decoder.
    private static JsonObject Mistral(JsonObject model)
    {
        var m = (JsonObject)model.DeepClone();
        m["fuse_unk"] = false;
        int inst = m["vocab"]!.AsObject().Max(kv => kv.Value!.GetValue<int>()) + 1;
        return new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
            ["added_tokens"] = new JsonArray(Added(0, "<unk>"), Added(1, "<s>"), Added(2, "</s>"), Added(inst, "[INST]", lstrip: true, rstrip: true)),
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "first", ["split"] = false },
            ["post_processor"] = Bos("<s>", 1),
            ["decoder"] = new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "first", ["split"] = false },
            ["model"] = m,
        };
    }
}
