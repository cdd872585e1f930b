using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// The smallest real Hugging Face tokenizer a benchmark model folder needs so that <c>qlora train</c> runs on it: byte-level
/// BPE in GPT-2 / Llama 3 style with the 256 byte tokens (id = byte value) and no merges, then <c>&lt;|begin_of_text|&gt;</c>
/// and <c>&lt;|end_of_text|&gt;</c> (BOS added by the post-processor). One token per byte makes a text sample of n
/// ASCII characters exactly n + 1 tokens long, so a benchmark sizes its sequences by the characters it writes.
/// </summary>
public static class ByteLevelTokenizerFiles
{
    /// <summary>Id of the BOS token.</summary>
    public const int BosId = 256;
    /// <summary>Id of the EOS token.</summary>
    public const int EosId = 257;
    /// <summary>Tokens in all (the model's vocabulary must have at least this many rows).</summary>
    public const int VocabSize = 258;

    /// <summary>Writes tokenizer.json, tokenizer_config.json and generation_config.json into <paramref name="folder"/>.</summary>
    public static void Write(string folder)
    {
        var vocab = new JsonObject();
        for (int b = 0; b < 256; b++) vocab[ByteLevelAlphabet.ByteToChar[b].ToString()] = b;
        JsonObject Added(int id, string content) => new()
        {
            ["id"] = id, ["content"] = content, ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true,
        };
        JsonObject ByteLevel(bool prefixSpace, bool trim) => new() { ["type"] = "ByteLevel", ["add_prefix_space"] = prefixSpace, ["trim_offsets"] = trim, ["use_regex"] = true };
        JsonObject Bos() => new() { ["SpecialToken"] = new JsonObject { ["id"] = "<|begin_of_text|>", ["type_id"] = 0 } };
        JsonObject Seq(string id, int typeId) => new() { ["Sequence"] = new JsonObject { ["id"] = id, ["type_id"] = typeId } };
        var root = new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
            ["added_tokens"] = new JsonArray(Added(BosId, "<|begin_of_text|>"), Added(EosId, "<|end_of_text|>")),
            ["normalizer"] = null,
            ["pre_tokenizer"] = ByteLevel(false, true),
            ["post_processor"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["processors"] = new JsonArray(ByteLevel(true, false), new JsonObject
                {
                    ["type"] = "TemplateProcessing",
                    ["single"] = new JsonArray(Bos(), Seq("A", 0)),
                    ["pair"] = new JsonArray(Bos(), Seq("A", 0), Bos(), Seq("B", 1)),
                    ["special_tokens"] = new JsonObject
                    {
                        ["<|begin_of_text|>"] = new JsonObject { ["id"] = "<|begin_of_text|>", ["ids"] = new JsonArray(BosId), ["tokens"] = new JsonArray("<|begin_of_text|>") },
                    },
                }),
            },
            ["decoder"] = ByteLevel(false, true),
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = null, ["end_of_word_suffix"] = null,
                ["fuse_unk"] = false, ["byte_fallback"] = false, ["ignore_merges"] = false, ["vocab"] = vocab, ["merges"] = new JsonArray(),
            },
        };
        Directory.CreateDirectory(folder);
        File.WriteAllText(Path.Combine(folder, "tokenizer.json"), root.ToJsonString());
        File.WriteAllText(Path.Combine(folder, "tokenizer_config.json"),
            new JsonObject { ["bos_token"] = "<|begin_of_text|>", ["eos_token"] = "<|end_of_text|>" }.ToJsonString());
        File.WriteAllText(Path.Combine(folder, "generation_config.json"),
            new JsonObject { ["bos_token_id"] = BosId, ["eos_token_id"] = EosId }.ToJsonString());
    }
}
