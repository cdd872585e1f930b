using System.Text.Json.Nodes;
using QLora.Quant;
using QLora.Quant.Gguf;
using QLora.Trainer;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace QLora.Export.Tests;

/// <summary>
/// The other shapes the exporter handles, run by llama.cpp against qlora's float32 forward: Qwen2 (architecture
/// <c>qwen2</c>: q/k/v biases, no row permutation) and Llama (also with Llama 3.1 and linear RoPE scaling), all with tied embeddings (no output.weight) and random
/// float32 weights, with the bundled byte-level tokenizer.
/// </summary>
public sealed class ArchitectureAgreementTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "qlora-arch-tests-" + Guid.NewGuid().ToString("N"));

    [Theory]
    [InlineData(true, null)]
    [InlineData(false, null)]
    [InlineData(false, "llama3")]
    [InlineData(false, "linear")]
    public void Tied_random_models_agree_with_qlora_in_llama_cpp(bool qwen, string? ropeScaling)
    {
        string name = (qwen ? "qwen2" : "llama") + (ropeScaling is null ? "" : "-" + ropeScaling);
        var folder = WriteRandomModel(Path.Combine(_dir, name), qwen, ropeScaling: ropeScaling);
        var gguf = Path.Combine(_dir, name + ".gguf");
        GgufExporter.Export(folder, null, gguf, GgufFileType.F16);
        using (var r = GgufReader.Open(gguf))
        {
            Assert.Equal(qwen ? "qwen2" : "llama", r.MetadataByKey["general.architecture"].AsString());
            Assert.DoesNotContain(r.Tensors, t => t.Name == "output.weight");
            Assert.Equal(qwen, r.Tensors.Any(t => t.Name == "blk.0.attn_q.bias"));
            Assert.Equal(ropeScaling == "llama3", r.Tensors.Any(t => t.Name == "rope_freqs.weight"));
            Assert.Equal(ropeScaling == "linear", r.MetadataByKey.ContainsKey("llama.rope.scaling.type"));
        }
        using var model = HfModelLoader.Load(folder, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        using var tok = HfTokenizer.Load(folder);
        using var cpp = new LlamaCpp(gguf);
        var ids = tok.Encode("In June 25, 1969, the month is 06.", addSpecialTokens: true);
        var expected = Logits.Of(model, ids);
        var actual = cpp.Logits(ids);
        double worst = Logits.MaxDifference(expected, actual), scale = Logits.MaxMagnitude(expected);
        if (ropeScaling is not null)
        {
            // Control: the same weights without the scaling disagree clearly, so the scaling really reached llama.cpp.
            var plain = WriteRandomModel(Path.Combine(_dir, name + "-unscaled"), qwen);
            using var unscaled = HfModelLoader.Load(plain, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
            double control = Logits.MaxDifference(Logits.Of(unscaled, ids), actual);
            output.WriteLine($"{name}: without the scaling the difference would be {control:G3}");
            Assert.True(control > 10 * worst, $"the unscaled model is as close ({control}) as the scaled one ({worst})");
        }
        output.WriteLine($"{name}: max |logit difference| {worst:G3}, largest |logit| {scale:G3}");
        Assert.True(scale > 1, "random model too flat to compare");
        Assert.True(worst <= 0.02 * scale, $"llama.cpp's logits differ by up to {worst} (largest logit {scale})");
    }

    internal static string WriteRandomModel(string dir, bool qwen, int vocab = 259, bool copyTokenizer = true, string? ropeScaling = null)
    {
        const int hidden = 64, inter = 128, layers = 2, heads = 4, kvHeads = 2;
        Directory.CreateDirectory(dir);
        var rng = new Random(qwen ? 5 : 6);
        var tensors = new List<(string, TensorDType, long[], byte[])>();
        void Add(string name, double center, double spread, params long[] shape)
        {
            long n = shape.Aggregate(1L, (a, d) => a * d);
            var f = new float[n];
            for (int i = 0; i < n; i++) f[i] = (float)(center + (rng.NextDouble() * 2 - 1) * spread);
            var bytes = new byte[n * 4];
            FloatTypes.FromFloat32(f, FloatType.Float32, bytes);
            tensors.Add((name, TensorDType.F32, shape, bytes));
        }
        Add("model.embed_tokens.weight", 0, 1.0, vocab, hidden);
        for (int l = 0; l < layers; l++)
        {
            var p = $"model.layers.{l}.";
            Add(p + "input_layernorm.weight", 1, 0.2, hidden);
            Add(p + "self_attn.q_proj.weight", 0, 0.25, heads * 16, hidden);
            Add(p + "self_attn.k_proj.weight", 0, 0.25, kvHeads * 16, hidden);
            Add(p + "self_attn.v_proj.weight", 0, 0.2, kvHeads * 16, hidden);
            if (qwen)
            {
                Add(p + "self_attn.q_proj.bias", 0, 0.3, heads * 16);
                Add(p + "self_attn.k_proj.bias", 0, 0.3, kvHeads * 16);
                Add(p + "self_attn.v_proj.bias", 0, 0.3, kvHeads * 16);
            }
            Add(p + "self_attn.o_proj.weight", 0, 0.2, hidden, heads * 16);
            Add(p + "post_attention_layernorm.weight", 1, 0.2, hidden);
            Add(p + "mlp.gate_proj.weight", 0, 0.2, inter, hidden);
            Add(p + "mlp.up_proj.weight", 0, 0.2, inter, hidden);
            Add(p + "mlp.down_proj.weight", 0, 0.15, hidden, inter);
        }
        Add("model.norm.weight", 1, 0.2, hidden);
        SafetensorsWriter.WriteFile(Path.Combine(dir, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray(qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM"), ["model_type"] = qwen ? "qwen2" : "llama",
            ["hidden_size"] = hidden, ["intermediate_size"] = inter, ["num_hidden_layers"] = layers, ["num_attention_heads"] = heads,
            ["num_key_value_heads"] = kvHeads, ["head_dim"] = 16, ["vocab_size"] = vocab, ["rms_norm_eps"] = 1e-6,
            ["rope_theta"] = qwen ? 1000000.0 : 10000.0, ["max_position_embeddings"] = 256, ["tie_word_embeddings"] = true,
            ["bos_token_id"] = copyTokenizer ? 256 : 1, ["eos_token_id"] = copyTokenizer ? 257 : 2, ["torch_dtype"] = "float32",
        };
        // Llama 3.1 scaling over a short original context, so head_dim 16's eight frequencies fall in all three bands.
        if (ropeScaling == "llama3")
            config["rope_scaling"] = new JsonObject { ["rope_type"] = "llama3", ["factor"] = 8.0, ["low_freq_factor"] = 1.0, ["high_freq_factor"] = 4.0, ["original_max_position_embeddings"] = 256 };
        else if (ropeScaling == "linear")
            config["rope_scaling"] = new JsonObject { ["type"] = "linear", ["factor"] = 4.0 };
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        if (!copyTokenizer) return dir;
        var tinyBase = Path.Combine(ExportedTinyModel.RepoRoot(), "models", "tiny-llama-base");
        foreach (var f in new[] { "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json" })
            File.Copy(Path.Combine(tinyBase, f), Path.Combine(dir, f));
        return dir;
    }

    public void Dispose()
    {
        try { Directory.Delete(_dir, recursive: true); } catch (IOException) { }
    }
}
