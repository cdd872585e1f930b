using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using QLora.Quant.Gguf;

namespace QLora.Trainer;

/// <summary>
/// The <c>tokenizer.*</c> metadata of a GGUF file from a Hugging Face tokenizer folder, as llama.cpp's loader expects
/// it: byte-level BPE (GPT-2, Llama 3, Qwen2) as model <c>gpt2</c> with its merges and the pre-tokenizer name whose
/// regex matches the tokenizer's, SentencePiece-style BPE/Unigram (Llama 2, Mistral) as model <c>llama</c> with scores
/// and token types; special tokens CONTROL, bos/eos/pad/unk ids, explicit add_bos/add_eos (what the HF tokenizer
/// does), and the chat template.
/// </summary>
public static partial class GgufTokenizer
{
    /// <summary>llama.cpp's token types.</summary>
    private const int Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6;

    // The byte-level pre-tokenizer regexes llama.cpp knows, by its name for them (llama-vocab.cpp).
    private static readonly (string Name, string Pattern)[] KnownSplitRegexes =
    [
        ("llama-bpe", @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
        ("qwen2", @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    ];

    /// <summary>Adds the tokenizer metadata of <paramref name="folder"/> for a model of <paramref name="vocabSize"/> embedding rows.</summary>
    public static void AddTo(GgufWriter writer, string folder, int vocabSize)
    {
        var path = Path.Combine(folder, TokenizerFiles.TokenizerJson);
        if (!File.Exists(path)) throw new FileNotFoundException($"{folder}: no {TokenizerFiles.TokenizerJson}; a GGUF file needs the tokenizer", path);
        var root = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new InvalidDataException($"{path}: not a JSON object");
        using var tok = HfTokenizer.Load(folder);
        if (tok.VocabSize > vocabSize)
            throw new InvalidDataException($"{path}: the tokenizer has {tok.VocabSize} tokens but the model only {vocabSize} embedding rows");
        var model = root["model"] as JsonObject ?? throw new InvalidDataException($"{path}: no model section");
        string modelType = model["type"]?.GetValue<string>() ?? "";
        bool byteLevel = UsesByteLevel(root["pre_tokenizer"]) || UsesByteLevel(root["decoder"]);
        bool sentencePiece = modelType == "Unigram" || (modelType == "BPE" && !byteLevel && (model["byte_fallback"]?.GetValue<bool>() == true || UsesMetaspace(root)));

        var tokens = new string[vocabSize];
        var types = new int[vocabSize];
        var scores = new float[vocabSize];
        var added = AddedIds(root);
        for (int id = 0; id < vocabSize; id++)
        {
            string? text = tok.IdToToken(id);
            if (text is null)
            {
                // Embedding rows past the tokenizer (padded vocabularies), named as llama.cpp's converter names them.
                tokens[id] = $"[PAD{id}]";
                types[id] = Unused;
                continue;
            }
            tokens[id] = text;
            types[id] = tok.IsSpecialToken(id) ? Control
                : added.Contains(id) ? UserDefined
                : id == tok.UnkTokenId ? Unknown
                : sentencePiece && ByteToken().IsMatch(text) ? Byte
                : Normal;
            if (id == tok.UnkTokenId && sentencePiece) types[id] = Unknown;
        }

        if (byteLevel && modelType == "BPE")
        {
            writer.Add("tokenizer.ggml.model", GgufValue.String("gpt2"));
            writer.Add("tokenizer.ggml.pre", GgufValue.String(PreTokenizerName(root, path)));
            writer.Add("tokenizer.ggml.tokens", GgufValue.Strings(tokens));
            writer.Add("tokenizer.ggml.token_type", GgufValue.Int32s(types));
            writer.Add("tokenizer.ggml.merges", GgufValue.Strings(Merges(model)));
        }
        else if (sentencePiece)
        {
            if (modelType == "Unigram")
            {
                // Unigram vocabularies carry their log-probabilities: [piece, score] pairs.
                var vocab = model["vocab"] as JsonArray ?? throw new InvalidDataException($"{path}: Unigram model without a vocab list");
                for (int id = 0; id < vocab.Count && id < vocabSize; id++) scores[id] = (float)vocab[id]![1]!.GetValue<double>();
            }
            else
            {
                // SentencePiece BPE gives piece i the score −i (earlier pieces merge first); specials and bytes score 0.
                for (int id = 0; id < vocabSize; id++) scores[id] = types[id] == Normal ? -id : 0;
            }
            writer.Add("tokenizer.ggml.model", GgufValue.String("llama"));
            writer.Add("tokenizer.ggml.pre", GgufValue.String("default"));
            writer.Add("tokenizer.ggml.tokens", GgufValue.Strings(tokens));
            writer.Add("tokenizer.ggml.scores", GgufValue.Float32s(scores));
            writer.Add("tokenizer.ggml.token_type", GgufValue.Int32s(types));
        }
        else throw new InvalidDataException($"{path}: a {modelType} tokenizer without byte-level BPE or SentencePiece conventions has no llama.cpp equivalent");

        if (tok.BosTokenId is int bos) writer.Add("tokenizer.ggml.bos_token_id", GgufValue.UInt32((uint)bos));
        if (tok.EosTokenId is int eos) writer.Add("tokenizer.ggml.eos_token_id", GgufValue.UInt32((uint)eos));
        if (tok.UnkTokenId is int unk) writer.Add("tokenizer.ggml.unknown_token_id", GgufValue.UInt32((uint)unk));
        if (tok.PadTokenId is int pad) writer.Add("tokenizer.ggml.padding_token_id", GgufValue.UInt32((uint)pad));
        // What the Hugging Face tokenizer does when asked to add special tokens (llama.cpp's defaults differ by model).
        var probe = tok.Encode("a", addSpecialTokens: true);
        writer.Add("tokenizer.ggml.add_bos_token", GgufValue.Bool(tok.BosTokenId is int b && probe.Length > 0 && probe[0] == b));
        writer.Add("tokenizer.ggml.add_eos_token", GgufValue.Bool(tok.EosTokenId is int e && probe.Length > 1 && probe[^1] == e));
        if (tok.ChatTemplateSource is { } template) writer.Add("tokenizer.chat_template", GgufValue.String(template));
    }

    private static HashSet<int> AddedIds(JsonObject root) =>
        (root["added_tokens"] as JsonArray)?.Select(t => t!["id"]!.GetValue<int>()).ToHashSet() ?? [];

    private static string[] Merges(JsonObject model)
    {
        if (model["merges"] is not JsonArray merges) return []; // llama.cpp needs the key, even empty
        return merges.Select(m => m switch
        {
            JsonArray pair => $"{pair[0]!.GetValue<string>()} {pair[1]!.GetValue<string>()}",
            _ => m!.GetValue<string>(),
        }).ToArray();
    }

    private static string PreTokenizerName(JsonObject root, string path)
    {
        var pre = root["pre_tokenizer"];
        if (pre is JsonObject { } p && p["type"]?.GetValue<string>() == "ByteLevel")
        {
            if (p["use_regex"]?.GetValue<bool>() == false) throw new InvalidDataException($"{path}: a ByteLevel pre-tokenizer without its regex has no llama.cpp equivalent");
            return "gpt-2"; // the GPT-2 regex; 'gpt2' is refused by llama.cpp's loader
        }
        foreach (var node in Flatten(pre))
        {
            if (node["type"]?.GetValue<string>() != "Split") continue;
            string? regex = node["pattern"]?["Regex"]?.GetValue<string>();
            foreach (var (name, pattern) in KnownSplitRegexes)
                if (regex == pattern) return name;
            throw new InvalidDataException($"{path}: the pre-tokenizer regex is not one llama.cpp knows (GPT-2, Llama 3, Qwen2); the GGUF file would split text differently");
        }
        throw new InvalidDataException($"{path}: cannot tell which llama.cpp pre-tokenizer matches this tokenizer");
    }

    private static IEnumerable<JsonObject> Flatten(JsonNode? node)
    {
        if (node is not JsonObject o) yield break;
        yield return o;
        if (o["pretokenizers"] is JsonArray list)
            foreach (var child in list)
                foreach (var x in Flatten(child)) yield return x;
        if (o["decoders"] is JsonArray decoders)
            foreach (var child in decoders)
                foreach (var x in Flatten(child)) yield return x;
    }

    private static bool UsesByteLevel(JsonNode? node) => Flatten(node).Any(o => o["type"]?.GetValue<string>() == "ByteLevel");

    private static bool UsesMetaspace(JsonObject root) =>
        Flatten(root["pre_tokenizer"]).Concat(Flatten(root["decoder"])).Any(o => o["type"]?.GetValue<string>() == "Metaspace")
        || (root["normalizer"] is JsonNode n && n.ToJsonString().Contains("\u2581", StringComparison.Ordinal));

    [GeneratedRegex("^<0x[0-9A-Fa-f]{2}>$")]
    private static partial Regex ByteToken();
}
