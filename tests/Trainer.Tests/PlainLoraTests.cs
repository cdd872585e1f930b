using QLora.Quant;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>Quantization:QuantType none: plain LoRA over a frozen 16-bit (or fp32) base.</summary>
public class PlainLoraTests
{
    static TrainJob Job(string quantType, string dtype = "float32") => new()
    {
        Model = { Path = "model", ComputeDType = dtype },
        Quantization = { QuantType = quantType },
        Data = { TrainFile = "train.jsonl" },
        Output = { Dir = "out" },
    };

    // Mean next-token cross-entropy of a float64 logits matrix [T, V] for ids.
    static double ReferenceLoss(Tensor logits, long[] ids)
    {
        using var scope = NewDisposeScope();
        var logp = logits.log_softmax(-1);
        double sum = 0;
        for (int t = 0; t + 1 < ids.Length; t++) sum -= logp[t, ids[t + 1]].item<double>();
        return sum / (ids.Length - 1);
    }

    [Fact]
    public void QuantTypeNoneLoadsFrozenDenseProjectionsWhoseLossEqualsAFloat64Reference()
    {
        using var scope = NewDisposeScope();
        using var dir = new TempFolder();
        var c = TinyLlama.Config();
        var tensors = HfModelLoaderTests.WriteFolder(dir.File("model"), c);
        var job = Job("none");
        Assert.Empty(job.Validate());
        using var model = HfModelLoader.Load(dir.File("model"), TrainingRun.LoaderOptionsOf(job));
        Assert.Empty(model.named_modules().Select(m => m.module).OfType<Linear4bit>());
        var q = (Linear)model.model.layers[0].self_attn.Projection("q_proj");
        Assert.Equal(ScalarType.Float32, q.weight!.dtype);
        Assert.False(q.weight.requires_grad);
        Assert.Contains(model.named_parameters(), p => p.name == "model.layers.1.mlp.down_proj.weight");

        long[] ids = [1, 5, 9, 33, 2, 63, 7, 12];
        var input = tensor(ids).unsqueeze(0);
        model.eval();
        var (sum, n) = model.Loss(input, input);
        double loss = sum.item<float>() / n;
        double reference = ReferenceLoss(LlamaModelTests.ReferenceLogits(c, name => tensors[name], ids), ids);
        Assert.True(Math.Abs(loss - reference) < 1e-5 * reference, $"loss {loss} vs float64 reference {reference}");

        // The same folder quantized (nf4, the default) is measurably different: the test can tell the two apart.
        using var nf4 = HfModelLoader.Load(dir.File("model"), TrainingRun.LoaderOptionsOf(Job("nf4")));
        nf4.eval();
        var (sum4, n4) = nf4.Loss(input, input);
        Assert.True(Math.Abs(sum4.item<float>() / n4 - reference) > 1e-4 * reference);

        // LoRA over the dense base trains the adapters only; the base weight gets no gradient and does not move.
        var before = q.weight.detach().clone();
        model.ApplyLora(new LoraOptions { Rank = 2, Alpha = 4 }, new Generator(3));
        model.train();
        var (s, k) = model.Loss(input, input);
        (s / k).backward();
        Assert.Null(q.weight.grad);
        Assert.All(model.TrainableParameters(), p => Assert.Contains(".lora_", p.Name));
        Assert.NotNull(model.TrainableParameters().First(p => p.Name.Contains("lora_A")).Parameter.grad);
        Assert.True(q.weight.eq(before).all().item<bool>());
    }

    [Fact]
    public void QuantTypeNoneDequantizesABnbFolderToTheWeightsTheFourBitModelComputesWith()
    {
        using var scope = NewDisposeScope();
        using var dir = new TempFolder();
        var c = TinyLlama.Config();
        HfModelLoaderTests.WriteFolder(dir.File("model"), c);
        CheckpointQuantizer.QuantizeFolder(dir.File("model"), dir.File("bnb"), new QuantizeOptions());
        var log = new List<string>();
        using var dense = HfModelLoader.Load(dir.File("bnb"), TrainingRun.LoaderOptionsOf(Job("none")), log.Add);
        using var fourBit = HfModelLoader.Load(dir.File("bnb"), TrainingRun.LoaderOptionsOf(Job("nf4")));
        Assert.Empty(dense.named_modules().Select(m => m.module).OfType<Linear4bit>());
        Assert.Contains(log, l => l.Contains("dequantized to Float32 on load"));
        // The decoded weight is Linear4bit's own dequantization of the stored codes, element for element.
        var stored = (Linear4bit)fourBit.model.layers[1].mlp.Projection("up_proj");
        var decoded = ((Linear)dense.model.layers[1].mlp.Projection("up_proj")).weight!;
        Assert.True(decoded.eq(stored.Dequantize(ScalarType.Float32)).all().item<bool>());
        dense.eval(); fourBit.eval();
        var ids = tensor(new long[] { 3, 1, 4, 1, 5, 9, 2, 6 }).unsqueeze(0);
        Assert.True(Linear4bitTests.RelErr(dense.Logits(ids).to(ScalarType.Float64), fourBit.Logits(ids).to(ScalarType.Float64)) < 1e-6);
    }

    [Fact]
    public void QuantTypeNoneIsValidatedAndPlannedAsSixteenBitWeights()
    {
        Assert.Empty(Job("none").Validate());
        Assert.Contains(Job("int4").Validate(), e => e.Contains("Quantization:QuantType") && e.Contains("none"));
        var streamed = Job("none");
        streamed.Model.Stream = true;
        Assert.Contains(streamed.Validate(), e => e.StartsWith("Model:Stream"));

        // Counted by hand: the tiny config's projections are 2·32·32 (q, o) + 2·16·32 (k, v) + 3·64·32 (gate, up, down) per layer.
        var c = TinyLlama.Config();
        long perLayer = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32;
        var job = Job("none", dtype: "bfloat16");
        var plan = MemoryPlanner.Plan(c, TrainingRun.PlanOptionsOf(job));
        Assert.Equal(2 * perLayer * c.NumHiddenLayers, plan.Components.Single(x => x.Name == StepMemorySimulation.QuantizedWeights).Bytes);
        Assert.DoesNotContain(plan.Components, x => x.Name == StepMemorySimulation.DequantBuffers);
        var quantized = MemoryPlanner.Plan(c, TrainingRun.PlanOptionsOf(Job("nf4", dtype: "bfloat16")));
        Assert.True(quantized.Components.Single(x => x.Name == StepMemorySimulation.QuantizedWeights).Bytes < 2 * perLayer * c.NumHiddenLayers);
    }
}
