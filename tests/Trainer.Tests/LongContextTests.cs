using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// The long-context mechanisms against the plain path on the same weights and batch: offloaded checkpoints must give
/// the same loss and LoRA gradients bit for bit (they only move bytes); the sequence-tiled MLP the same loss and
/// gradients up to the summation order (float32: to 1e-5; bf16: within bf16 rounding).
/// </summary>
public class LongContextTests
{
    private static (float Loss, Dictionary<string, Tensor> Grads) Step(ScalarType dtype, Action<LlamaForCausalLM> configure, int steps = 1)
    {
        var config = TinyLlama.Config(layers: 3, hidden: 64, heads: 4, kvHeads: 2, vocab: 96, inter: 160);
        using var model = LlamaForCausalLM.CreateRandom(config, 11, computeDType: dtype);
        model.ApplyLora(new LoraOptions { Rank = 4, Alpha = 8, Init = "gaussian" }, new Generator(5));
        using (no_grad())
            foreach (var (name, p) in model.TrainableParameters()) // B = 0 would hide the A gradients
                if (name.Contains(".lora_B.")) p.normal_(0, 0.05, new Generator(9));
        model.train();
        configure(model);
        var ids = randint(0, config.VocabSize, [2, 40], generator: new Generator(3));
        float loss = 0;
        for (int s = 0; s < steps; s++)
        {
            using var scope = NewDisposeScope();
            foreach (var (_, p) in model.TrainableParameters()) p.grad = null;
            var (sum, n) = model.Loss(ids, ids);
            Checkpoint.Backward(sum / n);
            loss = (sum / n).item<float>();
        }
        return (loss, model.TrainableParameters().ToDictionary(p => p.Name, p => p.Parameter.grad!.detach().clone().to(ScalarType.Float64)));
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void OffloadedCheckpointsGiveTheSameLossAndGradientsBitForBit(ScalarType dtype)
    {
        var plain = Step(dtype, _ => { }, steps: 2);
        var offloaded = Step(dtype, m => m.OffloadCheckpoints = true, steps: 2); // the second step reuses the slots
        Assert.Equal(plain.Loss, offloaded.Loss);
        foreach (var (name, g) in plain.Grads) Assert.True(g.eq(offloaded.Grads[name]).all().item<bool>(), $"{name}: gradients differ");
    }

    [Theory]
    [InlineData(ScalarType.Float32, 1e-5)]
    [InlineData(ScalarType.BFloat16, 2e-2)]
    public void ATiledMlpGivesTheSameLossAndGradientsUpToRounding(ScalarType dtype, double tolerance)
    {
        var plain = Step(dtype, _ => { });
        var tiled = Step(dtype, m => { m.MlpTileTokens = 24; m.OffloadCheckpoints = true; }); // 80 tokens: tiles of 24, 24, 24, 8
        Assert.Equal(plain.Loss, tiled.Loss, tolerance);
        foreach (var (name, g) in plain.Grads)
        {
            double scale = g.abs().max().item<double>() + 1e-12;
            double diff = (g - tiled.Grads[name]).abs().max().item<double>();
            Assert.True(diff <= tolerance * scale, $"{name}: max difference {diff:E3} against gradients up to {scale:E3}");
        }
        // and it really computed something different from nothing: the gradients are not all zero
        Assert.Contains(plain.Grads.Values, g => g.abs().max().item<double>() > 0);
    }

    [Theory]
    [InlineData(ScalarType.Float32, 1e-5)]
    [InlineData(ScalarType.BFloat16, 2e-2)]
    public void SegmentAttentionEqualsTheBlockDiagonalMaskWithoutOne(ScalarType dtype, double tolerance)
    {
        // two packed rows: samples of 5, 9 and 4 tokens, and of 11 then 3 padding tokens (their own segment)
        static TokenRow Row(int[] lengths, int seed, int pad)
        {
            var rng = new Random(seed);
            var ids = new List<int>(); var pos = new List<int>(); var seg = new List<int>();
            for (int s = 0; s < lengths.Length; s++)
                for (int i = 0; i < lengths[s]; i++) { ids.Add(rng.Next(1, 96)); pos.Add(i); seg.Add(s); }
            return new TokenRow([.. ids], [.. ids], [.. pos], [.. seg]);
        }
        var rows = new[] { Row([5, 9, 4], 1, 0), Row([7, 4], 2, 0) };
        using var masked = MicroBatch.Create(rows, 0);
        using var segmented = MicroBatch.Create(rows, 0, segmentAttention: true);
        Assert.NotNull(masked.AttentionMask);
        Assert.Null(segmented.AttentionMask);
        Assert.Equal(new[] { 5, 9, 4 }, segmented.Segments![0]);
        Assert.Equal(new[] { 7, 4, 7 }, segmented.Segments![1]); // 7 padding tokens form the last segment
        var results = new List<(float Loss, Dictionary<string, Tensor> Grads)>();
        foreach (var batch in new[] { masked, segmented })
        {
            var config = TinyLlama.Config(layers: 2, hidden: 64, vocab: 96, inter: 128);
            using var model = LlamaForCausalLM.CreateRandom(config, 4, computeDType: dtype);
            model.ApplyLora(new LoraOptions { Rank = 4, Alpha = 8 }, new Generator(5));
            using (no_grad())
                foreach (var (name, p) in model.TrainableParameters())
                    if (name.Contains(".lora_B.")) p.normal_(0, 0.05, new Generator(9));
            model.train();
            var (sum, n) = model.Loss(batch.InputIds, batch.Labels, batch.PositionIds, batch.AttentionMask, batch.Segments);
            Checkpoint.Backward(sum / n);
            results.Add(((sum / n).item<float>(), model.TrainableParameters().ToDictionary(p => p.Name, p => p.Parameter.grad!.to(ScalarType.Float64))));
        }
        Assert.Equal(results[0].Loss, results[1].Loss, tolerance);
        foreach (var (name, g) in results[0].Grads)
        {
            double scale = g.abs().max().item<double>() + 1e-12, diff = (g - results[1].Grads[name]).abs().max().item<double>();
            Assert.True(diff <= tolerance * scale, $"{name}: max difference {diff:E3} against gradients up to {scale:E3}");
        }
    }

    [Fact]
    public void TheTiledMlpEqualsTheWholeSequenceWithoutGrad()
    {
        var config = TinyLlama.Config(layers: 1, hidden: 64, inter: 160);
        using var model = LlamaForCausalLM.CreateRandom(config, 2, computeDType: ScalarType.Float32);
        model.eval();
        var ids = randint(0, config.VocabSize, [1, 50], generator: new Generator(1));
        using var whole = model.Logits(ids);
        model.MlpTileTokens = 16;
        using var tiled = model.Logits(ids);
        Assert.True(whole.allclose(tiled, rtol: 1e-5, atol: 1e-6));
    }
}
