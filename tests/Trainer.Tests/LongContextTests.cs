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
    private static (float Loss, Dictionary<string, Tensor> Grads) Step(ScalarType dtype, Action<LlamaForCausalLM> configure, int steps = 1, Device? device = null)
    {
        var config = TinyLlama.Config(layers: 3, hidden: 64, heads: 4, kvHeads: 2, vocab: 96, inter: 160);
        using var model = LlamaForCausalLM.CreateRandom(config, 11, computeDType: dtype, device: device);
        model.ApplyLora(new LoraOptions { Rank = 4, Alpha = 8, Init = "gaussian" }, new Generator(5));
        using (no_grad())
            foreach (var (name, p) in model.TrainableParameters()) // B = 0 would hide the A gradients
                if (name.Contains(".lora_B.")) p.normal_(0, 0.05, new Generator(9));
        model.train();
        configure(model);
        var ids = randint(0, config.VocabSize, [2, 40], generator: new Generator(3)).to(device ?? CPU);
        float loss = 0;
        for (int s = 0; s < steps; s++)
        {
            using var scope = NewDisposeScope();
            foreach (var (_, p) in model.TrainableParameters()) p.grad = null;
            var (sum, n) = model.Loss(ids, ids);
            Checkpoint.Backward(sum / n);
            loss = (sum / n).item<float>();
        }
        return (loss, model.TrainableParameters().ToDictionary(p => p.Name, p => p.Parameter.grad!.detach().to(CPU).to(ScalarType.Float64)));
    }

    /// <summary>Every gradient of <paramref name="actual"/> within <paramref name="tolerance"/> of the largest of its <paramref name="expected"/> counterpart.</summary>
    private static void AssertSameGradients(Dictionary<string, Tensor> expected, Dictionary<string, Tensor> actual, double tolerance)
    {
        foreach (var (name, g) in expected)
        {
            double scale = g.abs().max().item<double>() + 1e-12;
            double diff = (g - actual[name]).abs().max().item<double>();
            Assert.True(diff <= tolerance * scale, $"{name}: max difference {diff:E3} against gradients up to {scale:E3}");
        }
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

    [SkippableFact]
    public void OnCudaOffloadedCheckpointsGiveTheSameLossAndGradientsBitForBit()
    {
        // CudaActivationCopies: page-locked host slots, copies on a stream of the project's own, ordered with events.
        Skip.IfNot(DeviceTests.CudaUsable, "needs a CUDA device, a CUDA libtorch and the NVIDIA driver");
        var device = DeviceSelector.Resolve("cuda").Torch;
        var plain = Step(ScalarType.BFloat16, _ => { }, steps: 2, device: device);
        var offloaded = Step(ScalarType.BFloat16, m => m.OffloadCheckpoints = true, steps: 2, device: device);
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
        AssertSameGradients(plain.Grads, tiled.Grads, tolerance);
        // and it really computed something different from nothing: the gradients are not all zero
        Assert.Contains(plain.Grads.Values, g => g.abs().max().item<double>() > 0);
    }

    [Theory]
    [InlineData(ScalarType.Float32, 1e-5)]
    [InlineData(ScalarType.BFloat16, 2e-2)]
    public void TiledNormsGiveTheSameLossAndGradientsUpToRounding(ScalarType dtype, double tolerance)
    {
        var plain = Step(dtype, _ => { });
        var tiled = Step(dtype, m => { m.NormTileTokens = 24; m.MlpTileTokens = 24; m.OffloadCheckpoints = true; }); // 80 tokens: 24, 24, 24, 8
        Assert.Equal(plain.Loss, tiled.Loss, tolerance);
        AssertSameGradients(plain.Grads, tiled.Grads, tolerance);
    }

    [Theory]
    [InlineData(ScalarType.Float32, 1e-5)]
    [InlineData(ScalarType.BFloat16, 2e-2)]
    public void AttentionByGroupGivesTheSameLossAndGradientsUpToRounding(ScalarType dtype, double tolerance)
    {
        var plain = Step(dtype, _ => { }); // 4 query heads over 2 K/V heads
        var grouped = Step(dtype, m => { m.AttentionByGroup = true; m.OffloadCheckpoints = true; });
        Assert.Equal(plain.Loss, grouped.Loss, tolerance);
        AssertSameGradients(plain.Grads, grouped.Grads, tolerance);
    }

    /// <summary>Attention by group against SDPA over repeated K/V heads: the same output bit for bit, and the same q, k, v gradients up to float32 summation order.</summary>
    [Fact]
    public void AttentionByGroupEqualsRepeatedHeads()
    {
        var gen = new Generator(12);
        using var q0 = randn([2, 6, 21, 8], generator: gen);
        using var k0 = randn([2, 2, 21, 8], generator: gen);
        using var v0 = randn([2, 2, 21, 8], generator: gen);
        using var g = randn([2, 6, 21, 8], generator: gen);
        var (q1, k1, v1) = (q0.clone().requires_grad_(true), k0.clone().requires_grad_(true), v0.clone().requires_grad_(true));
        var (q2, k2, v2) = (q0.clone().requires_grad_(true), k0.clone().requires_grad_(true), v0.clone().requires_grad_(true));
        var expected = nn.functional.scaled_dot_product_attention(q1, k1.repeat_interleave(3, 1), v1.repeat_interleave(3, 1), is_casual: true);
        expected.backward([g]);
        var actual = GroupedQueryAttention.Apply(q2, k2, v2);
        actual.backward([g]);
        Assert.True(actual.detach().eq(expected.detach()).all().item<bool>(), "outputs differ");
        foreach (var (a, e) in new[] { (q2, q1), (k2, k1), (v2, v1) })
            Assert.True(a.grad!.allclose(e.grad!, rtol: 1e-5, atol: 1e-6), $"gradients differ by {(a.grad! - e.grad!).abs().max().item<float>():E3}");
        using (no_grad()) Assert.True(GroupedQueryAttention.Apply(q0, k0, v0).eq(expected.detach()).all().item<bool>(), "the no-grad path differs");
    }

    /// <summary>
    /// The tiled norm's hand-written backward against autograd's derivative of the plain formula in float64 (Llama's
    /// weight · cast(x·r) and Gemma's (1 + weight)·x·r), and its output against the plain form bit for bit.
    /// </summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void TheTiledNormsGradientIsTheDerivativeOfThePlainNorm(bool unitOffset)
    {
        var gen = new Generator(7);
        using var norm = new RmsNorm(48, 1e-5, ScalarType.Float32, unitOffset);
        using (no_grad()) norm.weight.normal_(1, 0.3, gen);
        using var x = (randn([2, 37, 48], generator: gen) * 3).requires_grad_(true);
        using var g = randn([2, 37, 48], generator: gen);
        // float64 reference: the formula, differentiated by autograd
        using var x64 = x.detach().to(ScalarType.Float64).requires_grad_(true);
        using var w64 = norm.weight.detach().to(ScalarType.Float64);
        using var y64 = x64 * (x64.pow(2).mean([-1L], keepdim: true) + 1e-5).rsqrt() * (unitOffset ? w64 + 1.0 : w64);
        y64.backward([g.to(ScalarType.Float64)]);
        using var plain = norm.forward(x.detach());
        norm.TileTokens = 10; // 74 tokens: tiles of 10 and a last one of 4
        using var y = norm.forward(x);
        Assert.True(y.detach().eq(plain).all().item<bool>(), "the tiled output differs from the plain one");
        y.backward([g]);
        double scale = x64.grad!.abs().max().item<double>();
        double diff = (x.grad!.to(ScalarType.Float64) - x64.grad!).abs().max().item<double>();
        Assert.True(diff <= 1e-5 * scale, $"max difference {diff:E3} against gradients up to {scale:E3}");
        Assert.True(scale > 0.1);
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
        AssertSameGradients(results[0].Grads, results[1].Grads, tolerance);
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
