using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class HfModelLoaderTests
{
    /// <summary>Writes a tiny random Llama in the HF layout with the project's safetensors writer; returns its tensors.</summary>
    internal static Dictionary<string, Tensor> WriteFolder(string dir, LlamaConfig c, string arch = "LlamaForCausalLM")
    {
        Directory.CreateDirectory(dir);
        using var probe = LlamaForCausalLM.CreateRandom(c, 21, quantize: false, computeDType: ScalarType.BFloat16);
        var tensors = probe.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        SafetensorsWriter.WriteFile(Path.Combine(dir, "model.safetensors"),
            tensors.Select(kv => (kv.Key, TensorDType.BF16, kv.Value.shape, kv.Value.contiguous().bytes.ToArray())),
            new Dictionary<string, string> { ["format"] = "pt" });
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray(arch), ["hidden_size"] = c.HiddenSize, ["intermediate_size"] = c.IntermediateSize,
            ["num_hidden_layers"] = c.NumHiddenLayers, ["num_attention_heads"] = c.NumAttentionHeads,
            ["num_key_value_heads"] = c.NumKeyValueHeads, ["vocab_size"] = c.VocabSize, ["rms_norm_eps"] = c.RmsNormEps,
            ["rope_theta"] = c.RopeTheta, ["tie_word_embeddings"] = false, ["torch_dtype"] = "bfloat16",
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        return tensors;
    }

    [Fact]
    public void AFolderQuantizedOnLoadEqualsTheSameWeightsQuantizedInMemory()
    {
        using var dir = new TempFolder();
        var c = TinyLlama.Config();
        var tensors = WriteFolder(dir.File("model"), c);
        var log = new List<string>();
        using var loaded = HfModelLoader.Load(dir.File("model"), log: log.Add);
        using var reference = LlamaForCausalLM.FromWeights(c, n => tensors.GetValueOrDefault(n));
        loaded.eval(); reference.eval();
        var ids = tensor(new long[] { 1, 2, 3, 40, 50, 60 }).unsqueeze(0);
        Assert.True(loaded.Logits(ids).eq(reference.Logits(ids)).all().item<bool>());
        Assert.Equal(14, loaded.named_modules().Select(m => m.module).OfType<Linear4bit>().Distinct().Count());
        Assert.Contains(log, l => l.StartsWith("config: LlamaForCausalLM"));
        Assert.Contains(log, l => l.StartsWith("model: "));
    }

    [Fact]
    public void TheHostEmbeddingReadsTheMappedCheckpointAndTrainsExactlyLikeADeviceCopy()
    {
        using var dir = new TempFolder();
        var c = TinyLlama.Config();
        var tensors = WriteFolder(dir.File("model"), c);
        using var host = HfModelLoader.Load(dir.File("model"));
        using var device = HfModelLoader.Load(dir.File("model"), new HfModelLoader.Options { HostEmbedding = false });
        Assert.True(host.model.embed_tokens.IsOnHost);
        Assert.False(device.model.embed_tokens.IsOnHost);
        // not a parameter (nothing for the device, the optimizer or Module.to), and the stored values unchanged
        Assert.DoesNotContain(host.named_parameters(), p => p.name == "model.embed_tokens.weight");
        Assert.True(host.model.embed_tokens.Table.eq(tensors["model.embed_tokens.weight"]).all().item<bool>());
        var grads = new List<Dictionary<string, Tensor>>();
        var losses = new List<float>();
        foreach (var m in new[] { host, device })
        {
            m.ApplyLora(new LoraOptions { Rank = 4, Alpha = 8, Init = "gaussian" }, new Generator(3));
            m.train();
            var ids = tensor(new long[] { 1, 2, 3, 40, 50, 60, 7, 8 }).unsqueeze(0);
            var (sum, n) = m.Loss(ids, ids);
            Checkpoint.Backward(sum / n);
            losses.Add(sum.item<float>());
            grads.Add(m.TrainableParameters().ToDictionary(p => p.Name, p => p.Parameter.grad!.clone()));
        }
        Assert.Equal(losses[1], losses[0]);
        foreach (var (name, g) in grads[1]) Assert.True(g.eq(grads[0][name]).all().item<bool>(), $"{name} gradient differs");
    }

    [Fact]
    public void ABnbFourBitFolderWrittenHereReloadsWithIdenticalCodes()
    {
        using var dir = new TempFolder();
        var c = TinyLlama.Config();
        WriteFolder(dir.File("model"), c);
        CheckpointQuantizer.QuantizeFolder(dir.File("model"), dir.File("bnb"), new QuantizeOptions());
        using var fromBnb = HfModelLoader.Load(dir.File("bnb"));
        using var onLoad = HfModelLoader.Load(dir.File("model"));
        var a = fromBnb.named_buffers().ToDictionary(b => b.name, b => b.buffer);
        var b = onLoad.named_buffers().ToDictionary(b => b.name, b => b.buffer);
        Assert.Equal(b.Keys.OrderBy(k => k), a.Keys.OrderBy(k => k));
        foreach (var (name, t) in b) Assert.True(t.eq(a[name]).all().item<bool>(), $"{name} differs");
        fromBnb.eval(); onLoad.eval();
        var ids = tensor(new long[] { 7, 8, 9 }).unsqueeze(0);
        Assert.True(fromBnb.Logits(ids).eq(onLoad.Logits(ids)).all().item<bool>());
    }

    [Fact]
    public void BadFoldersGetErrorsNamingWhatIsWrong()
    {
        using var dir = new TempFolder();
        var c = TinyLlama.Config();
        Assert.Contains("config.json", Assert.Throws<FileNotFoundException>(() => HfModelLoader.Load(dir.Path)).Message);
        WriteFolder(dir.File("gpt"), c, arch: "GPT2LMHeadModel");
        Assert.Contains("Qwen2ForCausalLM", Assert.Throws<FormatException>(() => HfModelLoader.Load(dir.File("gpt"))).Message);

        var tensors = WriteFolder(dir.File("bad"), c);
        tensors["model.layers.1.mlp.down_proj.weight"] = randn(8, 8).to(ScalarType.BFloat16);
        SafetensorsWriter.WriteFile(Path.Combine(dir.File("bad"), "model.safetensors"),
            tensors.Select(kv => (kv.Key, TensorDType.BF16, kv.Value.shape, kv.Value.contiguous().bytes.ToArray())));
        Assert.Contains("model.layers.1.mlp.down_proj.weight", Assert.Throws<ArgumentException>(() => HfModelLoader.Load(dir.File("bad"))).Message);

        tensors.Remove("model.layers.1.mlp.down_proj.weight");
        SafetensorsWriter.WriteFile(Path.Combine(dir.File("bad"), "model.safetensors"),
            tensors.Select(kv => (kv.Key, TensorDType.BF16, kv.Value.shape, kv.Value.contiguous().bytes.ToArray())));
        Assert.Contains("missing weight model.layers.1.mlp.down_proj.weight", Assert.Throws<ArgumentException>(() => HfModelLoader.Load(dir.File("bad"))).Message);
    }
}
