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

    /// <summary>bitsandbytes' weight for compute dtype fp32: the reference decoder's output in the stored dtype, widened.</summary>
    private static Tensor BnbWeight(QuantizedTensor q)
    {
        var stored = q.State.DType;
        var bytes = new byte[q.Count * stored.Size()];
        FourBitReferenceDequantizer.Dequantize(q, stored, bytes);
        using var t = TorchDTypes.FromBytes(bytes, new TensorInfo("w", stored.ToTensorDType(), q.State.Shape, 0, bytes.LongLength));
        return t.to(ScalarType.Float64);
    }

    [Fact]
    public void Fp32ComputeRoundsTheWeightToItsStoredDtypeFirstInForwardAndBackward()
    {
        using var scope = NewDisposeScope();
        var w = (randn(48, 64, generator: new TorchSharp.torch.Generator(7)) * 0.05).to(ScalarType.BFloat16);
        using var layer = Linear4bit.Quantize(w, computeDType: ScalarType.Float32);
        var q = Linear4bit.QuantizeWeight(w);
        Assert.Equal(FloatType.BFloat16, q.State.DType);
        var expectedW = BnbWeight(q);
        var x = randn(5, 64, generator: new TorchSharp.torch.Generator(8)).requires_grad_(true);
        var y = layer.forward(x);
        var g = randn(5, 48, generator: new TorchSharp.torch.Generator(9));
        y.backward([g]);
        var x64 = x.detach().to(ScalarType.Float64);
        Assert.True(Linear4bitTests.RelErr(y, x64.matmul(expectedW.t())) < 1e-6, "forward");
        Assert.True(Linear4bitTests.RelErr(x.grad!, g.to(ScalarType.Float64).matmul(expectedW)) < 1e-6, "backward");
        // Decoding straight to fp32 gives other values (what the test guards against).
        var direct = new byte[q.Count * 4];
        FourBitReferenceDequantizer.Dequantize(q, FloatType.Float32, direct);
        using var directW = TorchDTypes.FromBytes(direct, new TensorInfo("w", TensorDType.F32, q.State.Shape, 0, direct.LongLength));
        Assert.True(Linear4bitTests.RelErr(directW, expectedW) > 1e-3);
    }

    [Fact]
    public void ADynamicFolderComputesAsTransformersLoadsIt()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var tensors = WriteDynamicFolder(dir);
        // Reference: skipped modules dense as stored, the others as bitsandbytes dequantizes them for fp32 compute.
        var reference = new Dictionary<string, Tensor>();
        using (var checkpoint = SafetensorsCheckpoint.Open(dir.File("bnb")))
            foreach (var (name, t) in tensors)
                reference[name] = BnbCheckpointLayout.IsQuantized(checkpoint, name)
                    ? BnbWeight(BnbCheckpointLayout.Read(checkpoint, name)).to(ScalarType.Float32) : t.to(ScalarType.Float32);
        var c = TinyLlama.Config();
        using var expectedModel = LlamaForCausalLM.FromWeights(c, n => reference.GetValueOrDefault(n), quantize: false, computeDType: ScalarType.Float32);
        using var model = HfModelLoader.Load(dir.File("bnb"), new HfModelLoader.Options { ComputeDType = ScalarType.Float32 });
        model.eval(); expectedModel.eval();
        var ids = tensor(new long[] { 1, 2, 3, 40, 50, 60, 7 }).unsqueeze(0);
        double rel = Linear4bitTests.RelErr(model.Logits(ids), expectedModel.Logits(ids).to(ScalarType.Float64));
        Assert.True(rel < 1e-5, $"relative error {rel}");
    }

    /// <summary>
    /// What transformers does with a folder: each Linear module (projections and lm_head) is converted to 4-bit unless
    /// llm_int8_skip_modules names it (null: lm_head only). It loads only if exactly the converted ones are stored 4-bit.
    /// </summary>
    private static void AssertTransformersWouldLoad(string folder, LlamaConfig c)
    {
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "config.json")))!.AsObject();
        var bnb = BnbQuantizationConfig.FromConfig(config)!;
        var rule = bnb.SkipModules is null ? new BnbQuantizationConfig { SkipModules = ["lm_head"] } : bnb;
        using var checkpoint = SafetensorsCheckpoint.Open(folder);
        var linear = Enumerable.Range(0, c.NumHiddenLayers)
            .SelectMany(l => Projections.Select(p => $"model.layers.{l}.{(p is "gate_proj" or "up_proj" or "down_proj" ? "mlp" : "self_attn")}.{p}"))
            .Append("lm_head");
        foreach (var module in linear)
            Assert.True(!rule.SkipsModule(module) == BnbCheckpointLayout.IsQuantized(checkpoint, module + ".weight"), module);
    }

    [Fact]
    public void QuantizingASubsetWritesTheSkipListTransformersNeeds()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var c = TinyLlama.Config();
        HfModelLoaderTests.WriteFolder(dir.File("dense"), c);
        CheckpointQuantizer.QuantizeFolder(dir.File("dense"), dir.File("qv"), new QuantizeOptions { Include = @"\.(q|v)_proj\.weight$" });
        var skip = BnbQuantizationConfig.FromConfig(JsonNode.Parse(File.ReadAllText(dir.File("qv/config.json")))!.AsObject())!.SkipModules;
        string[] expected =
        [
            "lm_head",
            "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
            "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
            "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj",
        ];
        Assert.Equal(expected, skip);
        AssertTransformersWouldLoad(dir.File("qv"), c);
        using (var model = HfModelLoader.Load(dir.File("qv")))
        {
            Assert.IsType<Linear4bit>(Projection(model, 1, "v_proj"));
            Assert.IsType<Linear>(Projection(model, 1, "k_proj"));
        }

        // The default (every projection) keeps transformers' default: null, lm_head dense.
        CheckpointQuantizer.QuantizeFolder(dir.File("dense"), dir.File("all"), new QuantizeOptions());
        Assert.Null(JsonNode.Parse(File.ReadAllText(dir.File("all/config.json")))!["quantization_config"]!["llm_int8_skip_modules"]);
        AssertTransformersWouldLoad(dir.File("all"), c);

        // The embedding is never quantized by transformers: refused, nothing written.
        var e = Assert.Throws<ArgumentException>(() => CheckpointQuantizer.QuantizeFolder(dir.File("dense"), dir.File("emb"), new QuantizeOptions { Include = "weight$" }));
        Assert.Contains("model.embed_tokens.weight", e.Message);
        Assert.False(Directory.Exists(dir.File("emb")));
    }

    [Fact]
    public void QuantizingLmHeadWritesAnEmptySkipListAndTheFolderLoads()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var c = TinyLlama.Config();
        var tensors = HfModelLoaderTests.WriteFolder(dir.File("dense"), c);
        CheckpointQuantizer.QuantizeFolder(dir.File("dense"), dir.File("bnb"), new QuantizeOptions { Include = QuantizeOptions.DefaultInclude + @"|^lm_head\.weight$" });
        var q = JsonNode.Parse(File.ReadAllText(dir.File("bnb/config.json")))!["quantization_config"]!;
        Assert.Empty(q["llm_int8_skip_modules"]!.AsArray()); // [] converts lm_head too; null would keep it dense
        AssertTransformersWouldLoad(dir.File("bnb"), c);

        var reference = new Dictionary<string, Tensor>();
        using (var checkpoint = SafetensorsCheckpoint.Open(dir.File("bnb")))
            foreach (var (name, t) in tensors)
                reference[name] = BnbCheckpointLayout.IsQuantized(checkpoint, name)
                    ? BnbWeight(BnbCheckpointLayout.Read(checkpoint, name)).to(ScalarType.Float32) : t.to(ScalarType.Float32);
        using var expectedModel = LlamaForCausalLM.FromWeights(c, n => reference.GetValueOrDefault(n), quantize: false, computeDType: ScalarType.Float32);
        using var model = HfModelLoader.Load(dir.File("bnb"), new HfModelLoader.Options { ComputeDType = ScalarType.Float32 });
        model.eval(); expectedModel.eval();
        var ids = tensor(new long[] { 5, 6, 7, 8 }).unsqueeze(0);
        double rel = Linear4bitTests.RelErr(model.Logits(ids), expectedModel.Logits(ids).to(ScalarType.Float64));
        Assert.True(rel < 1e-5, $"relative error {rel}");
    }
}
