using System.Buffers.Binary;
using System.Text;
using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// DoRA (PEFT's use_dora) against a float64 reference of PEFT's formula, written here from DoraLinearLayer and
/// DoraLinearVariant: s = m / ‖W + scaling·B·A‖ per output row with the norm a constant (detached),
/// y = base(x) + (s − 1)·(base(x) − bias) + s·B(A(x))·scaling; with dropout in training, (s − 1)·x'Wᵀ and s·B(A(x'))
/// of the dropped input x'; merge W' = s·(W + scaling·B·A).
/// </summary>
public class DoraTests
{
    const double Scaling = 2.0; // alpha 8 / r 4

    /// <summary>The reference in float64: output, and the gradients of x, A, B and m for the output gradient given.</summary>
    private sealed record Reference(Tensor Y, Tensor Gx, Tensor Ga, Tensor Gb, Tensor Gm);

    private static Reference PeftDora(Tensor w, Tensor? bias, Tensor a, Tensor b, Tensor m, Tensor x, Tensor gy, Tensor? dropMask = null, bool detachNorm = true)
    {
        var w64 = w.detach().to(ScalarType.Float64);
        var a64 = a.detach().to(ScalarType.Float64).requires_grad_(true);
        var b64 = b.detach().to(ScalarType.Float64).requires_grad_(true);
        var m64 = m.detach().to(ScalarType.Float64).requires_grad_(true);
        var x64 = x.detach().to(ScalarType.Float64).requires_grad_(true);
        // PEFT: weight_norm = ‖W + scaling·(B·A).detach()‖ per row, then weight_norm.detach().
        var norm = detachNorm
            ? (w64 + b64.detach().matmul(a64.detach()) * Scaling).square().sum(1).sqrt()
            : (w64 + b64.matmul(a64) * Scaling).square().sum(1).sqrt();
        var s = m64 / norm;
        var result = x64.matmul(w64.t());
        if (bias is not null) result = result + bias.detach().to(ScalarType.Float64);
        var xl = dropMask is null ? x64 : x64 * dropMask.to(ScalarType.Float64);
        var baseResult = dropMask is null ? x64.matmul(w64.t()) : xl.matmul(w64.t());
        var lora = xl.matmul(a64.t()).matmul(b64.t());
        var y = result + (s - 1) * baseResult + s * lora * Scaling;
        y.backward([gy.to(ScalarType.Float64)]);
        return new Reference(y.detach(), x64.grad!, a64.grad!, b64.grad!, m64.grad!);
    }

    private static double RelErr(Tensor actual, Tensor expected) => Linear4bitTests.RelErr(actual, expected.detach().to(ScalarType.Float64));

    /// <summary>A layer with non-zero B and a magnitude moved off its initial value, so every term is exercised.</summary>
    private static LoraLinear Dora(nn.Module<Tensor, Tensor> baseLayer, Generator gen, double dropout = 0)
    {
        var lora = new LoraLinear(baseLayer, new LoraOptions { Rank = 4, Alpha = 8, UseDora = true, Init = "gaussian", Dropout = dropout }, gen);
        using (no_grad())
        {
            lora.LoraB("default").normal_(0, 0.3, generator: gen);
            lora.Magnitude("default")!.mul_(rand(lora.OutFeatures, generator: gen) + 0.5);
        }
        return lora;
    }

    private static Tensor DenseWeight(LoraLinear l) => l.BaseLayer switch
    {
        Linear4bit q => q.Dequantize(ScalarType.Float32),
        Linear d => d.weight!.detach(),
        _ => throw new InvalidOperationException(),
    };

    private static Tensor? BaseBias(LoraLinear l) => l.BaseLayer switch
    {
        Linear4bit q => q.Bias,
        Linear d => d.bias,
        _ => null,
    };

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void ForwardAndGradientsOfInputABAndMagnitudeMatchAFloat64ReferenceOfPeftsFormula(bool fourBit)
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(21);
        var w = randn(24, 40, generator: gen) * 0.2;
        var bias = randn(24, generator: gen) * 0.1;
        nn.Module<Tensor, Tensor> baseLayer = fourBit
            ? Linear4bit.Quantize(w, bias, computeDType: ScalarType.Float32)
            : nn.Linear(40, 24, hasBias: true);
        if (!fourBit)
            using (no_grad()) { ((Linear)baseLayer).weight!.copy_(w); ((Linear)baseLayer).bias!.copy_(bias); }
        var lora = Dora(baseLayer, gen);
        var x = randn(2, 3, 40, generator: gen).requires_grad_(true);
        var gy = randn(2, 3, 24, generator: gen);
        var y = lora.forward(x);
        y.backward([gy]);

        var r = PeftDora(DenseWeight(lora), BaseBias(lora), lora.LoraA("default"), lora.LoraB("default"), lora.Magnitude("default")!, x, gy);
        Assert.True(RelErr(y, r.Y) < 1e-5, $"forward {RelErr(y, r.Y)}");
        Assert.True(RelErr(x.grad!, r.Gx) < 1e-5, $"input gradient {RelErr(x.grad!, r.Gx)}");
        Assert.True(RelErr(lora.LoraA("default").grad!, r.Ga) < 1e-5, $"A gradient {RelErr(lora.LoraA("default").grad!, r.Ga)}");
        Assert.True(RelErr(lora.LoraB("default").grad!, r.Gb) < 1e-5, $"B gradient {RelErr(lora.LoraB("default").grad!, r.Gb)}");
        Assert.True(RelErr(lora.Magnitude("default")!.grad!, r.Gm) < 1e-5, $"magnitude gradient {RelErr(lora.Magnitude("default")!.grad!, r.Gm)}");

        // The norm is a constant in backward: had the gradient flowed through it, A's and B's gradients would differ.
        var undetached = PeftDora(DenseWeight(lora), BaseBias(lora), lora.LoraA("default"), lora.LoraB("default"), lora.Magnitude("default")!, x, gy, detachNorm: false);
        Assert.True(RelErr(undetached.Ga, r.Ga) > 1e-3, "the test must tell a detached norm from an attached one (A)");
        Assert.True(RelErr(lora.LoraA("default").grad!, undetached.Ga) > 1e-3, "A's gradient must not flow through the norm");
        Assert.True(RelErr(lora.LoraB("default").grad!, undetached.Gb) > 1e-3, "B's gradient must not flow through the norm");
    }

    [Fact]
    public void Bf16ComputeFollowsTheReferenceWithinBf16Rounding()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(22);
        var lora = Dora(Linear4bit.Quantize(randn(32, 48, generator: gen) * 0.2), gen); // bf16 compute, float32 adapters
        var x = randn(4, 48, generator: gen).to(ScalarType.BFloat16).requires_grad_(true);
        var gy = randn(4, 32, generator: gen).to(ScalarType.BFloat16);
        var y = lora.forward(x);
        y.backward([gy]);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
        Assert.Equal(ScalarType.Float32, lora.Magnitude("default")!.grad!.dtype);
        var r = PeftDora(DenseWeight(lora), null, lora.LoraA("default"), lora.LoraB("default"), lora.Magnitude("default")!, x, gy);
        Assert.True(RelErr(y, r.Y) < 2e-2, $"forward {RelErr(y, r.Y)}");
        Assert.True(RelErr(lora.Magnitude("default")!.grad!, r.Gm) < 2e-2, $"magnitude gradient {RelErr(lora.Magnitude("default")!.grad!, r.Gm)}");
        Assert.True(RelErr(lora.LoraA("default").grad!, r.Ga) < 2e-2, $"A gradient {RelErr(lora.LoraA("default").grad!, r.Ga)}");
    }

    [Fact]
    public void WithDropoutTheDroppedInputFeedsTheAdapterAndTheRescaledBaseTerm()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(23);
        var lora = Dora(Linear4bit.Quantize(randn(16, 32, generator: gen) * 0.2, randn(16, generator: gen) * 0.1, computeDType: ScalarType.Float32), gen, dropout: 0.3);
        lora.train();
        var x = randn(5, 32, generator: gen).requires_grad_(true);
        var gy = randn(5, 16, generator: gen);
        random.manual_seed(77);
        var y = lora.forward(x);
        y.backward([gy]);
        // The same draw again: dropout of ones is the mask (0 or 1/(1−p)) the layer multiplied x by.
        random.manual_seed(77);
        var mask = nn.functional.dropout(ones(5, 32), 0.3, training: true);
        Assert.True(mask.eq(0).any().item<bool>());
        var r = PeftDora(DenseWeight(lora), BaseBias(lora), lora.LoraA("default"), lora.LoraB("default"), lora.Magnitude("default")!, x, gy, mask);
        Assert.True(RelErr(y, r.Y) < 1e-5, $"forward {RelErr(y, r.Y)}");
        Assert.True(RelErr(x.grad!, r.Gx) < 1e-5, $"input gradient {RelErr(x.grad!, r.Gx)}");
        Assert.True(RelErr(lora.Magnitude("default")!.grad!, r.Gm) < 1e-5, $"magnitude gradient {RelErr(lora.Magnitude("default")!.grad!, r.Gm)}");
        // PEFT's rule matters: the undropped base term would give another output.
        var plain = PeftDora(DenseWeight(lora), BaseBias(lora), lora.LoraA("default"), lora.LoraB("default"), lora.Magnitude("default")!, x, gy);
        Assert.True(RelErr(y, plain.Y) > 1e-3);
        // In eval mode dropout is off and the formula is the undropped one.
        lora.eval();
        using (no_grad()) Assert.True(RelErr(lora.forward(x), plain.Y) < 1e-5);
    }

    [Fact]
    public void TheMagnitudeStartsAsTheRowNormOfTheDequantizedWeightAndTheLayerAsItsBase()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(24);
        var baseLayer = Linear4bit.Quantize(randn(20, 36, generator: gen)); // quantized from float32: W is what Dequantize(Float32) gives
        var lora = new LoraLinear(baseLayer, new LoraOptions { Rank = 4, Alpha = 8, UseDora = true }, gen);
        var m = lora.Magnitude("default")!;
        Assert.Equal(new long[] { 20 }, m.shape);
        Assert.True(m.requires_grad);
        var w64 = baseLayer.Dequantize(ScalarType.Float32).to(ScalarType.Float64);
        var expected = w64.square().sum(1).sqrt();
        Assert.True(RelErr(m, expected) < 1e-6, $"magnitude {RelErr(m, expected)}");
        var x = randn(3, 36, generator: gen).to(ScalarType.BFloat16);
        using var _ = no_grad();
        var y = lora.forward(x).to(ScalarType.Float32);
        var plain = baseLayer.forward(x).to(ScalarType.Float32);
        Assert.True((y - plain).abs().max().item<float>() <= 4 * Math.Pow(2, -8) * plain.abs().max().item<float>()); // s = 1 up to rounding
    }

    [Fact]
    public void TheNormIsChunkedOverRowsWithTheSameResult()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(25);
        Assert.Equal(3, DoraWeightNorm.ChunkRows(7, DoraWeightNorm.ChunkElements / 3));
        Assert.Equal(7, DoraWeightNorm.ChunkRows(7, 100));
        Assert.Equal(1, DoraWeightNorm.ChunkRows(7, 2 * DoraWeightNorm.ChunkElements));
        const long inF = 50;
        var w = randn(7, inF, generator: gen).to(ScalarType.BFloat16);
        var b = randn(7, 2, generator: gen);
        var a = randn(2, inF, generator: gen) * 0.1;
        var norm = DoraWeightNorm.Compute(w, b, a, 0.5, chunkElements: 3 * inF); // chunks of 3, 3 and 1 rows
        var expected = (w.to(ScalarType.Float64) + b.to(ScalarType.Float64).matmul(a.to(ScalarType.Float64)) * 0.5).square().sum(1).sqrt();
        Assert.True(RelErr(norm, expected) < 1e-6, $"norm {RelErr(norm, expected)}");
    }

    [Fact]
    public void MergedDenseLayerEqualsTheUnmergedForwardAndUnmergeRestores()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(26);
        var dense = nn.Linear(32, 16, hasBias: true);
        var original = dense.weight!.detach().clone();
        var lora = Dora(dense, gen);
        var x = randn(5, 32, generator: gen);
        using var _ = no_grad();
        var unmerged = lora.forward(x);
        // PEFT's merge in float64: W' = m / ‖W + ΔW‖ · (W + ΔW).
        var sum = original.to(ScalarType.Float64) + lora.DeltaWeight("default").to(ScalarType.Float64);
        var expectedW = sum * (lora.Magnitude("default")!.to(ScalarType.Float64) / sum.square().sum(1).sqrt()).unsqueeze(1);
        lora.Merge();
        Assert.True(RelErr(dense.weight!, expectedW) < 1e-6, "merged weight");
        var merged = lora.forward(x);
        Assert.True(RelErr(merged, unmerged) < 1e-5, $"merged vs unmerged {RelErr(merged, unmerged)}");
        lora.Unmerge();
        Assert.True(RelErr(dense.weight!, original) < 1e-6, "unmerge restores W");
        Assert.True(RelErr(lora.forward(x), unmerged) < 1e-6);
    }

    /// <summary>DoRA on four projections of <paramref name="m"/> with random A and B and magnitudes scaled by 0.5–1.5, so every term matters.</summary>
    private static LoraOptions AddDora(LlamaForCausalLM m, int rank = 4, double std = 0.2, IReadOnlyList<string>? targets = null)
    {
        var o = new LoraOptions { Rank = rank, Alpha = 2 * rank, UseDora = true, TargetModules = targets ?? ["q_proj", "o_proj", "up_proj", "down_proj"] };
        m.ApplyLora(o, new Generator(31));
        using (no_grad())
            foreach (var (name, p) in m.TrainableParameters())
                if (name.Contains(".lora_magnitude_vector.")) p.mul_(rand(p.shape, generator: new Generator(33)) + 0.5);
                else p.normal_(0, std, generator: new Generator(32));
        return o;
    }

    private static (LlamaForCausalLM Model, LoraOptions Options) Adapted()
    {
        var m = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 30);
        var o = AddDora(m);
        m.eval();
        return (m, o);
    }

    [Fact]
    public void GenerationWithAnUnmergedDoraAdapterEqualsRecomputingTheWholeSequence()
    {
        using var m = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 40, computeDType: ScalarType.Float32, initStd: 0.3);
        AddDora(m, rank: 2, std: 0.3, targets: LoraOptions.AllLinear);
        m.eval();
        int[] prompt = [3, 14, 15, 9, 2];
        var cached = TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 10 });
        Assert.Equal(TextGeneratorTests.GreedyWithoutCache(m, prompt, 10), cached);
        var batch = TextGenerator.GenerateBatch(m, [prompt, [7, 1]], new GenerationOptions { MaxNewTokens = 10 });
        Assert.Equal(cached, batch[0]);
        m.DisableAdapters(true);
        Assert.NotEqual(cached, TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 10 }));
    }

    [Fact]
    public void SaveThenLoadUsesPeftKeysAndShapesAndGivesIdenticalOutputs()
    {
        using var dir = new TempFolder();
        var (m, o) = Adapted();
        using var _m = m;
        // In memory: PEFT's state-dict name, lora_magnitude_vector.<adapter>.weight.
        Assert.Contains(m.TrainableParameters(), p => p.Name == "model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight");
        PeftAdapter.Save(m, o, dir.Path);

        // On disk, read without the project's reader: PEFT saves the magnitude as <module>.lora_magnitude_vector [out].
        var bytes = File.ReadAllBytes(dir.File("adapter_model.safetensors"));
        long len = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        var header = JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, (int)len))!.AsObject();
        Assert.Equal(2 * 4 * 3 + 1, header.Count); // 2 layers x 4 modules x (A, B, m) + metadata
        Assert.Equal("[32]", header["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]!["shape"]!.ToJsonString());
        Assert.Equal("[32]", header["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"]!["shape"]!.ToJsonString());
        Assert.Equal("[64]", header["base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"]!["shape"]!.ToJsonString());
        Assert.Equal("F32", header["base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"]!["dtype"]!.GetValue<string>());
        Assert.True(JsonNode.Parse(File.ReadAllText(dir.File("adapter_config.json")))!["use_dora"]!.GetValue<bool>());

        using var fresh = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 30);
        fresh.eval();
        var loaded = PeftAdapter.Load(fresh, dir.Path);
        Assert.True(loaded.UseDora);
        var ids = tensor(new long[] { 3, 1, 4, 1, 5, 9, 2, 6 }).unsqueeze(0);
        Assert.True(m.Logits(ids).eq(fresh.Logits(ids)).all().item<bool>());
        var layer = fresh.LoraLayers.Single(l => l.Name == "model.layers.1.mlp.up_proj").Layer;
        Assert.True(layer.Magnitude("default")!.eq(m.LoraLayers.Single(l => l.Name == "model.layers.1.mlp.up_proj").Layer.Magnitude("default")!).all().item<bool>());
    }

    [Fact]
    public void AnAdapterConfigWithUseDoraLoadsAndAMissingOrStrayMagnitudeIsRefused()
    {
        using var dir = new TempFolder();
        var (m, o) = Adapted();
        using var _m = m;
        PeftAdapter.Save(m, o, dir.File("dora"));
        // An adapter_config.json as PEFT 0.13 writes it for a DoRA adapter.
        Directory.CreateDirectory(dir.File("peft"));
        File.Copy(dir.File("dora/adapter_model.safetensors"), dir.File("peft/adapter_model.safetensors"));
        File.WriteAllText(dir.File("peft/adapter_config.json"), """
            {"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "tiny", "bias": "none", "fan_in_fan_out": false,
             "inference_mode": true, "init_lora_weights": true, "layer_replication": null, "layers_pattern": null,
             "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_dropout": 0.05, "megatron_config": null,
             "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA", "r": 4, "rank_pattern": {},
             "revision": null, "target_modules": ["up_proj", "o_proj", "q_proj", "down_proj"], "task_type": "CAUSAL_LM",
             "use_dora": true, "use_rslora": false}
            """);
        Assert.True(PeftAdapter.ReadOptions(dir.File("peft")).UseDora);
        using (var fresh = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 30))
        {
            fresh.eval();
            PeftAdapter.Load(fresh, dir.File("peft"));
            var ids = tensor(new long[] { 2, 7, 1, 8 }).unsqueeze(0);
            Assert.True(m.Logits(ids).eq(fresh.Logits(ids)).all().item<bool>());
        }

        // use_dora false with magnitude vectors in the file: refused by name, not silently dropped.
        File.WriteAllText(dir.File("peft/adapter_config.json"), File.ReadAllText(dir.File("peft/adapter_config.json")).Replace("\"use_dora\": true", "\"use_dora\": false"));
        using (var fresh = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 30))
        {
            var e = Assert.Throws<InvalidDataException>(() => PeftAdapter.Load(fresh, dir.File("peft")));
            Assert.Contains("lora_magnitude_vector", e.Message);
            Assert.Contains("use_dora", e.Message);
        }

        // use_dora true without magnitude vectors (a plain LoRA file): refused, naming the missing tensor.
        var (plain, po) = (LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 30), o with { UseDora = false });
        using (plain)
        {
            plain.ApplyLora(po, new Generator(1));
            PeftAdapter.Save(plain, po, dir.File("plain"));
        }
        File.WriteAllText(dir.File("plain/adapter_config.json"), File.ReadAllText(dir.File("plain/adapter_config.json")).Replace("\"use_dora\": false", "\"use_dora\": true"));
        HfModelLoaderTests.WriteFolder(dir.File("base"), TinyLlama.Config());
        var missing = Assert.Throws<InvalidDataException>(() => AdapterMerger.Merge(dir.File("base"), dir.File("plain"), dir.File("merged")));
        Assert.Contains("lora_magnitude_vector", missing.Message);
        Assert.False(Directory.Exists(dir.File("merged")));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void QloraMergeOfADoraAdapterEqualsTheUnmergedModel(bool bnbBase)
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        HfModelLoaderTests.WriteFolder(dir.File("base"), TinyLlama.Config());
        string baseFolder = dir.File("base");
        if (bnbBase)
        {
            CheckpointQuantizer.QuantizeFolder(dir.File("base"), dir.File("bnb"), new QuantizeOptions());
            baseFolder = dir.File("bnb");
        }
        // The adapter is trained against the base it merges into (a 4-bit base: its dequantized weights).
        using (var m = HfModelLoader.Load(baseFolder, new HfModelLoader.Options { ComputeDType = ScalarType.Float32 }))
        {
            PeftAdapter.Save(m, AddDora(m), dir.File("adapter"));
        }
        var report = AdapterMerger.Merge(baseFolder, dir.File("adapter"), dir.File("merged"), dtype: FloatType.Float32);
        Assert.Equal(2 * 4, report.Merged);

        var fp32 = new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 };
        using var merged = HfModelLoader.Load(dir.File("merged"), fp32);
        using var reference = HfModelLoader.Load(baseFolder, bnbBase ? new HfModelLoader.Options { ComputeDType = ScalarType.Float32 } : fp32);
        PeftAdapter.Load(reference, dir.File("adapter"));
        merged.eval();
        reference.eval();
        var ids = tensor(new long[] { 4, 8, 15, 16, 23, 42 }).unsqueeze(0);
        var expected = reference.Logits(ids).to(ScalarType.Float64);
        var actual = merged.Logits(ids).to(ScalarType.Float64);
        double rel = ((actual - expected).norm() / expected.norm()).item<double>();
        Assert.True(rel < 1e-5, $"relative error {rel}"); // float32 merge and float32 forward
        // Without the DoRA rescaling the merge would be plain LoRA's, far off.
        reference.DisableAdapters(true);
        Assert.True(((reference.Logits(ids).to(ScalarType.Float64) - expected).norm() / expected.norm()).item<double>() > 1e-2);
    }

    [Fact]
    public void ATinyDoraRunTrainsTheMagnitudeAndItsLossFalls()
    {
        var config = TinyLlama.Config(layers: 2, hidden: 32, heads: 4, kvHeads: 2, vocab: 32, inter: 64);
        using var model = LlamaForCausalLM.CreateRandom(config, 11, initStd: 0.3);
        model.ApplyLora(new LoraOptions { Rank = 8, Alpha = 16, UseDora = true }, new Generator(12));
        model.train();
        var trainable = model.TrainableParameters();
        var magnitudes = trainable.Where(p => p.Name.EndsWith(".lora_magnitude_vector.default.weight", StringComparison.Ordinal)).ToList();
        Assert.Equal(14, magnitudes.Count);
        // r·(in + out) + out per adapted layer: the magnitude is counted with the trainable parameters.
        long expected = MemoryPlanner.ProjectionShapes(config).Sum(s => 8 * (s.In + s.Out) + s.Out) * 2;
        Assert.Equal(expected, trainable.Sum(p => p.Parameter.numel()));
        // LoRA+ puts the magnitude with B (PEFT: lora_B or any 1-D parameter).
        var groups = model.ParameterGroups(1e-3, 16);
        Assert.All(magnitudes, p => Assert.Contains(groups[1].Parameters, q => q.Name == p.Name));
        Assert.DoesNotContain(groups[0].Parameters, q => q.Name.Contains("magnitude"));

        using var optimizer = new BnbAdamW(model.ParameterGroups(2e-2), new AdamWOptions { LearningRate = 2e-2 });
        Assert.Equal(trainable.Count, optimizer.Parameters.Count());
        var before = magnitudes[0].Parameter.detach().clone();
        var gen = new Generator(13);
        var losses = new List<float>();
        for (int step = 0; step < 40; step++)
        {
            using var scope = NewDisposeScope();
            var start = randint(0, 32, [8, 1], generator: gen);
            var ids = (start + arange(16, dtype: ScalarType.Int64).unsqueeze(0) * 3).remainder(32);
            var (sum, tokens) = model.Loss(ids, ids);
            var loss = sum / tokens;
            Checkpoint.Backward(loss);
            optimizer.Step();
            optimizer.ZeroGrad();
            losses.Add(loss.item<float>());
        }
        float first = losses.Take(3).Average(), last = losses.Skip(35).Average();
        Assert.True(last < 0.5 * first, $"loss {first} -> {last}");
        Assert.False(magnitudes[0].Parameter.eq(before).all().item<bool>(), "the magnitude is trained");
    }

    [Fact]
    public void ADoraJobWritesADoraAdapterAndAResumedRunReproducesTheUninterruptedLosses()
    {
        using var a = new TempFolder();
        using var b = new TempFolder();
        static void Dora(JsonObject job) => job["Lora"]!["UseDora"] = true;
        static TrainingRun.Result Run(string jobPath, string? resume = null, int? cancelAt = null, List<string>? log = null)
        {
            using var cts = new CancellationTokenSource();
            return TrainingRun.Run(JobConfiguration.LoadTrainJob(jobPath, environment: false), new TrainingRun.RunOptions
            {
                Resume = resume,
                Log = log is null ? null : log.Add,
                Cancellation = cts.Token,
                Progress = p => { if (p.Step == cancelAt) cts.Cancel(); },
            });
        }
        var log = new List<string>();
        var full = Run(TrainJobFixture.WriteJob(a.Path, Dora), log: log);
        Assert.Contains(log, l => l.StartsWith("DoRA r=4 alpha=8 on ", StringComparison.Ordinal) && l.Contains(" modules: "));
        Assert.True(PeftAdapter.ReadOptions(a.File("out")).UseDora);
        using (var reader = SafetensorsReader.Open(a.File("out/adapter_model.safetensors")))
            Assert.Equal(2 * 7, reader.Tensors.Count(t => t.Name.EndsWith(".lora_magnitude_vector", StringComparison.Ordinal))); // 2 layers x 7 projections

        var jobB = TrainJobFixture.WriteJob(b.Path, Dora);
        var stopped = Run(jobB, cancelAt: 3);
        Assert.Equal(3, stopped.Summary.Steps);
        var resumed = Run(jobB, resume: "latest");
        Assert.Equal(3, resumed.Summary.ResumedFromStep);
        double[] Losses(TrainingRun.Result r) => r.State.History.Where(h => h.Step > 3).Select(h => h.Loss).ToArray();
        Assert.Equal(3, Losses(full).Length);
        Assert.Equal(Losses(full), Losses(resumed)); // bit-identical: the magnitudes and their optimizer state were checkpointed
        Assert.Equal(full.Summary.EvalLoss, resumed.Summary.EvalLoss);

        // A plain LoRA job cannot resume a DoRA checkpoint: refused, naming the magnitude vector.
        File.WriteAllText(jobB, File.ReadAllText(jobB).Replace("\"UseDora\":true", "\"UseDora\":false"));
        var e = Assert.ThrowsAny<Exception>(() => Run(jobB, resume: "latest"));
        Assert.Contains("lora_magnitude_vector", e.Message);
    }
}
