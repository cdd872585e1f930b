using System.Buffers.Binary;
using System.Text;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class PeftAdapterTests
{
    private static (LlamaForCausalLM Model, LoraOptions Options) Adapted(int seed)
    {
        var m = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 30);
        var o = new LoraOptions { Rank = 4, Alpha = 16, Dropout = 0.05, TargetModules = ["q_proj", "v_proj", "down_proj"] };
        m.ApplyLora(o, new Generator((ulong)seed));
        using (no_grad())
            foreach (var (_, p) in m.TrainableParameters()) p.normal_(0, 0.1, generator: new Generator((ulong)seed + 1));
        m.eval();
        return (m, o);
    }

    [Fact]
    public void SavedFilesHaveThePeftKeysShapesDtypesAndConfigFields()
    {
        using var dir = new TempFolder();
        var (m, o) = Adapted(1);
        using var _ = m;
        PeftAdapter.Save(m, o, dir.Path, baseModel: "tiny-llama");

        // Raw header, read without the project's reader.
        var bytes = File.ReadAllBytes(dir.File("adapter_model.safetensors"));
        long len = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        var header = JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, (int)len))!.AsObject();
        Assert.Equal("pt", header["__metadata__"]!["format"]!.GetValue<string>());
        Assert.Equal(2 * 3 * 2 + 1, header.Count);
        Assert.Equal("[4,32]", header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]!["shape"]!.ToJsonString());
        Assert.Equal("[32,4]", header["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]!["shape"]!.ToJsonString());
        Assert.Equal("[16,4]", header["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]!["shape"]!.ToJsonString());
        Assert.Equal("[4,64]", header["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]!["shape"]!.ToJsonString());
        Assert.Equal("F32", header["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]!["dtype"]!.GetValue<string>());

        var text = File.ReadAllText(dir.File("adapter_config.json"));
        Assert.StartsWith("{\n  \"alpha_pattern\": {},\n  \"base_model_name_or_path\": \"tiny-llama\",", text);
        var config = JsonNode.Parse(text)!.AsObject();
        var keys = config.Select(kv => kv.Key).ToList();
        Assert.Equal(keys.OrderBy(k => k, StringComparer.Ordinal), keys);
        Assert.Equal("LORA", config["peft_type"]!.GetValue<string>());
        Assert.Equal("CAUSAL_LM", config["task_type"]!.GetValue<string>());
        Assert.Equal(4, config["r"]!.GetValue<int>());
        Assert.Equal(16, config["lora_alpha"]!.GetValue<int>());
        Assert.Equal(0.05, config["lora_dropout"]!.GetValue<double>());
        Assert.Equal("[\"down_proj\",\"q_proj\",\"v_proj\"]", config["target_modules"]!.ToJsonString());
        Assert.Equal("none", config["bias"]!.GetValue<string>());
        Assert.False(config["use_rslora"]!.GetValue<bool>());
        Assert.False(config["use_dora"]!.GetValue<bool>());
        Assert.False(config["fan_in_fan_out"]!.GetValue<bool>());
        Assert.True(config["inference_mode"]!.GetValue<bool>());
        Assert.Null(config["modules_to_save"]);
        Assert.Null(config["layers_to_transform"]);
    }

    [Fact]
    public void SaveThenLoadGivesIdenticalOutputs()
    {
        using var dir = new TempFolder();
        var (m, o) = Adapted(2);
        using var _ = m;
        PeftAdapter.Save(m, o, dir.Path);
        using var fresh = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 30);
        fresh.eval();
        var loaded = PeftAdapter.Load(fresh, dir.Path);
        Assert.Equal(4, loaded.Rank);
        var ids = tensor(new long[] { 3, 1, 4, 1, 5, 9, 2, 6 }).unsqueeze(0);
        Assert.True(m.Logits(ids).eq(fresh.Logits(ids)).all().item<bool>());
    }

    [Fact]
    public void AnAdapterThatDoesNotMatchTheModelIsAClearError()
    {
        using var dir = new TempFolder();
        var (m, o) = Adapted(3);
        using var _ = m;
        PeftAdapter.Save(m, o, dir.Path);
        using var wider = LlamaForCausalLM.CreateRandom(TinyLlama.Config(hidden: 48, heads: 4, kvHeads: 2), 31);
        var e = Assert.Throws<InvalidDataException>(() => PeftAdapter.Load(wider, dir.Path));
        Assert.Contains("lora_A.weight has shape [4, 32]", e.Message);
        using var shallow = LlamaForCausalLM.CreateRandom(TinyLlama.Config(layers: 1), 32);
        var e2 = Assert.Throws<InvalidDataException>(() => PeftAdapter.Load(shallow, dir.Path));
        Assert.Contains("model.layers.1", e2.Message);
        Assert.Throws<FileNotFoundException>(() => PeftAdapter.Load(shallow, dir.File("nowhere")));
    }
}
