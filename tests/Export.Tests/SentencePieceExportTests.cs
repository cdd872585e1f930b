using System.Text.Json.Nodes;
using QLora.Quant.Gguf;
using QLora.Trainer;

namespace QLora.Export.Tests;

/// <summary>
/// A SentencePiece-style tokenizer.json (Llama 2 / Mistral: BPE with byte fallback, "▁" for spaces) becomes
/// tokenizer.ggml.model <c>llama</c> with scores and token types, and llama.cpp then splits text into the same ids as
/// the Hugging Face tokenizer, byte fallback included.
/// </summary>
public sealed class SentencePieceExportTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "qlora-spm-tests-" + Guid.NewGuid().ToString("N"));

    [Fact]
    public void Llama_cpp_tokenizes_like_the_hugging_face_tokenizer()
    {
        var pieces = new List<string> { "▁", "t", "h", "e", "a", "i", "n", "o", "r", "d", "s", "c", "T" };
        // merges in rank order; each result gets the next id, so SentencePiece's score −id ranks them the same way
        var merges = new (string, string)[] { ("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("o", "n"), ("▁a", "n"), ("▁an", "d"), ("e", "r"), ("▁", "c") };
        var vocab = new JsonObject { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2 };
        for (int b = 0; b < 256; b++) vocab[$"<0x{b:X2}>"] = 3 + b;
        foreach (var p in pieces) vocab[p] = vocab.Count;
        foreach (var (a, b) in merges) vocab[a + b] = vocab.Count;
        int size = vocab.Count;
        JsonObject Special(int id, string content) => new()
        {
            ["id"] = id, ["content"] = content, ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true,
        };
        var tokenizer = new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
            ["added_tokens"] = new JsonArray(Special(0, "<unk>"), Special(1, "<s>"), Special(2, "</s>")),
            ["normalizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["normalizers"] = new JsonArray(
                    new JsonObject { ["type"] = "Prepend", ["prepend"] = "▁" },
                    new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = " " }, ["content"] = "▁" }),
            },
            ["pre_tokenizer"] = null,
            ["post_processor"] = new JsonObject
            {
                ["type"] = "TemplateProcessing",
                ["single"] = new JsonArray(new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<s>", ["type_id"] = 0 } },
                    new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }),
                ["pair"] = new JsonArray(new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<s>", ["type_id"] = 0 } },
                    new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } },
                    new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "B", ["type_id"] = 1 } }),
                ["special_tokens"] = new JsonObject { ["<s>"] = new JsonObject { ["id"] = "<s>", ["ids"] = new JsonArray(1), ["tokens"] = new JsonArray("<s>") } },
            },
            ["decoder"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["decoders"] = new JsonArray(
                    new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = "▁" }, ["content"] = " " },
                    new JsonObject { ["type"] = "ByteFallback" }, new JsonObject { ["type"] = "Fuse" },
                    new JsonObject { ["type"] = "Strip", ["content"] = " ", ["start"] = 1, ["stop"] = 0 }),
            },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = "<unk>", ["continuing_subword_prefix"] = null, ["end_of_word_suffix"] = null,
                ["fuse_unk"] = true, ["byte_fallback"] = true, ["ignore_merges"] = false, ["vocab"] = vocab,
                ["merges"] = new JsonArray(merges.Select(m => (JsonNode?)$"{m.Item1} {m.Item2}").ToArray()),
            },
        };
        var folder = ArchitectureAgreementTests.WriteRandomModel(Path.Combine(_dir, "spm"), qwen: false, vocab: size, copyTokenizer: false);
        File.WriteAllText(Path.Combine(folder, "tokenizer.json"), tokenizer.ToJsonString());
        File.WriteAllText(Path.Combine(folder, "tokenizer_config.json"),
            new JsonObject { ["bos_token"] = "<s>", ["eos_token"] = "</s>", ["unk_token"] = "<unk>", ["add_bos_token"] = true }.ToJsonString());
        var gguf = Path.Combine(_dir, "spm.gguf");
        GgufExporter.Export(folder, null, gguf, GgufFileType.Q8_0);

        using (var r = GgufReader.Open(gguf))
        {
            var m = r.MetadataByKey;
            Assert.Equal("llama", m["tokenizer.ggml.model"].AsString());
            var types = m["tokenizer.ggml.token_type"].AsArray<int>();
            var scores = m["tokenizer.ggml.scores"].AsArray<float>();
            Assert.Equal([2, 3, 3], types[..3]); // UNKNOWN, CONTROL, CONTROL
            Assert.All(types[3..259], t => Assert.Equal(6, t)); // BYTE
            Assert.All(types[259..], t => Assert.Equal(1, t)); // NORMAL
            Assert.Equal(-(size - 1), scores[^1]);
            Assert.Equal(0L, m["tokenizer.ggml.unknown_token_id"].AsInt64());
        }
        using var hf = HfTokenizer.Load(folder);
        using var cpp = new LlamaCpp(gguf);
        foreach (var text in new[] { "the cat and the hen", "Then in on", "and théâtre 1969!", "  two  spaces" })
        {
            var expected = hf.Encode(text, addSpecialTokens: true);
            Assert.True(expected.Length > 2);
            Assert.Equal(expected, cpp.Tokenize(text));
        }
    }

    public void Dispose()
    {
        try { Directory.Delete(_dir, recursive: true); } catch (IOException) { }
    }
}
