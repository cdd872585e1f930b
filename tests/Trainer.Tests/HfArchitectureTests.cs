using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>Llama, Mistral-style and Qwen2-style folders in the HF layout, with a real tokenizer.json, against float64.</summary>
public class HfArchitectureTests
{
    private static readonly string[] Words = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"];

    private static void WriteTokenizer(string dir)
    {
        var vocab = new JsonObject();
        for (int i = 0; i < Words.Length; i++) vocab[Words[i]] = i;
        var added = new JsonArray();
        for (int i = 0; i < 3; i++)
            added.Add(new JsonObject { ["id"] = i, ["content"] = Words[i], ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true });
        var tokenizer = new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null, ["added_tokens"] = added, ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "Whitespace" }, ["post_processor"] = null, ["decoder"] = null,
            ["model"] = new JsonObject { ["type"] = "WordLevel", ["vocab"] = vocab, ["unk_token"] = "<unk>" },
        };
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), tokenizer.ToJsonString());
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), """{"bos_token": "<s>", "eos_token": "</s>"}""");
    }

    [Theory]
    [InlineData("LlamaForCausalLM")]
    [InlineData("MistralForCausalLM")]
    [InlineData("Qwen2ForCausalLM")]
    public void AFolderLoadsAndItsLogitsMatchAFloat64Reference(string arch)
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        bool qwen = arch == "Qwen2ForCausalLM", mistral = arch == "MistralForCausalLM";
        var c = TinyLlama.Config(qwen: qwen) with { Architecture = arch, SlidingWindow = mistral ? 4 : null };
        var w = new Dictionary<string, Tensor>();
        using (var probe = LlamaForCausalLM.CreateRandom(c, 50, quantize: false, computeDType: ScalarType.Float32, initStd: 0.1))
            foreach (var (name, p) in probe.named_parameters()) w[name] = p.detach().clone();
        SafetensorsWriter.WriteFile(dir.File("model.safetensors"),
            w.Select(kv => (kv.Key, TensorDType.F32, kv.Value.shape, kv.Value.contiguous().bytes.ToArray())));
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray(arch), ["hidden_size"] = c.HiddenSize, ["intermediate_size"] = c.IntermediateSize,
            ["num_hidden_layers"] = c.NumHiddenLayers, ["num_attention_heads"] = c.NumAttentionHeads, ["num_key_value_heads"] = c.NumKeyValueHeads,
            ["vocab_size"] = c.VocabSize, ["rms_norm_eps"] = c.RmsNormEps, ["rope_theta"] = c.RopeTheta, ["tie_word_embeddings"] = false,
        };
        if (mistral) config["sliding_window"] = 4;
        if (qwen) { config["sliding_window"] = 32768; config["use_sliding_window"] = false; } // as Qwen2 configs ship
        File.WriteAllText(dir.File("config.json"), config.ToJsonString());
        WriteTokenizer(dir.Path);

        using var tokenizer = HfTokenizer.Load(dir.Path);
        tokenizer.EnsureMatchesEmbedding(c.VocabSize);
        var ids = tokenizer.Encode("the cat sat on the mat a dog sat", addSpecialTokens: false);
        Assert.Equal(new[] { 3, 4, 5, 6, 3, 7, 8, 9, 5 }, ids);
        Assert.Equal("the cat sat on the mat a dog sat", tokenizer.Decode(ids));

        using var model = HfModelLoader.Load(dir.Path, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        Assert.Equal(mistral ? 4 : null, model.Config.SlidingWindow);
        model.eval();
        var longIds = ids.Select(i => (long)i).ToArray();
        var logits = model.Logits(tensor(longIds).unsqueeze(0))[0];
        var reference = LlamaModelTests.ReferenceLogits(c, n => w[n], longIds);
        double rel = Linear4bitTests.RelErr(logits, reference);
        Assert.True(rel < 1e-5, $"{arch}: relative error {rel}");
    }
}
