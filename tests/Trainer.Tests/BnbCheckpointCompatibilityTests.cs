using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// bnb-4bit folders as transformers reads and writes them: modules named by quantization_config.llm_int8_skip_modules
/// stay dense, and fp32 compute dequantizes to the stored dtype first, as bitsandbytes does.
/// </summary>
public class BnbCheckpointCompatibilityTests
{
    private static readonly string[] Projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private static nn.Module<Tensor, Tensor> Projection(LlamaForCausalLM m, int layer, string proj) =>
        proj.EndsWith("_proj") && proj is "gate_proj" or "up_proj" or "down_proj" ? m.model.layers[layer].mlp.Projection(proj) : m.model.layers[layer].self_attn.Projection(proj);

    /// <summary>
    /// A "dynamic" 4-bit folder: every v_proj and layer 0's down_proj kept in bf16, the rest NF4, and the skip list in
    /// config.json written by hand in the form such checkpoints use.
    /// </summary>
    private static Dictionary<string, Tensor> WriteDynamicFolder(TempFolder dir)
    {
        var tensors = HfModelLoaderTests.WriteFolder(dir.File("dense"), TinyLlama.Config());
        CheckpointQuantizer.QuantizeFolder(dir.File("dense"), dir.File("bnb"), new QuantizeOptions
        {
            Include = @"^model\.layers\.(0\.(self_attn\.(q|k|o)_proj|mlp\.(gate|up)_proj)|1\.(self_attn\.(q|k|o)_proj|mlp\.(gate|up|down)_proj))\.weight$",
        });
        var configPath = dir.File("bnb/config.json");
        var config = JsonNode.Parse(File.ReadAllText(configPath))!.AsObject();
        config["quantization_config"]!["llm_int8_skip_modules"] = new JsonArray("lm_head", "model.layers.0.mlp.down_proj", "v_proj");
        File.WriteAllText(configPath, config.ToJsonString());
        return tensors;
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void SkippedModulesStayDenseOnLoad(bool streaming)
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var tensors = WriteDynamicFolder(dir);
        using var model = HfModelLoader.Load(dir.File("bnb"), new HfModelLoader.Options { ComputeDType = ScalarType.Float32, Streaming = streaming });
        for (int layer = 0; layer < 2; layer++)
            foreach (var proj in Projections)
            {
                var module = Projection(model, layer, proj);
                bool skipped = proj == "v_proj" || (layer == 0 && proj == "down_proj");
                if (!skipped)
                {
                    Assert.IsType<Linear4bit>(module);
                    continue;
                }
                // Dense, with exactly the stored bf16 values.
                var linear = Assert.IsType<Linear>(module);
                var name = $"model.layers.{layer}.{(proj is "down_proj" ? "mlp" : "self_attn")}.{proj}.weight";
                Assert.True(linear.weight!.to(ScalarType.Float64).eq(tensors[name].to(ScalarType.Float64)).all().item<bool>(), name);
            }
        model.eval();
        using var logits = model.Logits(tensor(new long[] { 1, 2, 3 }).unsqueeze(0));
        Assert.False(logits.isnan().any().item<bool>());
    }

    [Fact]
    public void TheSkipListFollowsTransformersMatchingRule()
    {
        // should_convert_module: a regex match at the start of the module name, or the name ending with the entry.
        var cfg = new BnbQuantizationConfig { SkipModules = ["lm_head", "down_proj", "model.layers.1.self_attn", "model.layers.2.mlp.up_proj"] };
        Assert.True(cfg.SkipsModule("lm_head"));
        Assert.True(cfg.SkipsModule("model.layers.7.mlp.down_proj"));
        Assert.True(cfg.SkipsModule("model.layers.1.self_attn.q_proj"));
        Assert.True(cfg.SkipsModule("model.layers.2.mlp.up_proj"));
        Assert.False(cfg.SkipsModule("model.layers.3.mlp.up_proj"));
        Assert.False(cfg.SkipsModule("model.layers.0.self_attn.q_proj"));
        Assert.False(new BnbQuantizationConfig().SkipsModule("lm_head"));
    }
}
