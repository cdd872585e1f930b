using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class LoraLinearTests
{
    [Fact]
    public void ForwardAndGradientsOfInputAAndBMatchAFloat64Reference()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(3);
        var w = randn(24, 40, generator: gen) * 0.1;
        var baseLayer = Linear4bit.Quantize(w); // bf16 compute
        var lora = new LoraLinear(baseLayer, new LoraOptions { Rank = 4, Alpha = 8, Init = "gaussian" }, gen);
        using (no_grad()) lora.LoraB("default").normal_(0, 0.1, generator: gen); // non-zero B so every gradient is exercised
        var x = randn(2, 3, 40, generator: gen).to(ScalarType.BFloat16).requires_grad_(true);
        var gy = randn(2, 3, 24, generator: gen);
        var y = lora.forward(x);
        y.backward([gy.to(y.dtype)]);

        // float64 reference from the dequantized base weight and the adapter's own values.
        var w64 = baseLayer.Dequantize(ScalarType.Float32).to(ScalarType.Float64);
        var a64 = lora.LoraA("default").detach().to(ScalarType.Float64).requires_grad_(true);
        var b64 = lora.LoraB("default").detach().to(ScalarType.Float64).requires_grad_(true);
        var x64 = x.detach().to(ScalarType.Float64).requires_grad_(true);
        var yRef = x64.matmul(w64.t()) + x64.matmul(a64.t()).matmul(b64.t()) * 2.0; // alpha / r = 2
        yRef.backward([gy.to(ScalarType.BFloat16).to(ScalarType.Float64)]);

        Assert.True(Linear4bitTests.RelErr(y, yRef) < 2e-2, "forward");
        Assert.True(Linear4bitTests.RelErr(x.grad!, x64.grad!) < 2e-2, "input gradient");
        // A and B are float32 master weights; their gradients carry the bf16 input's rounding only.
        Assert.True(Linear4bitTests.RelErr(lora.LoraA("default").grad!, a64.grad!) < 1e-2, "A gradient");
        Assert.True(Linear4bitTests.RelErr(lora.LoraB("default").grad!, b64.grad!) < 1e-2, "B gradient");
        Assert.Equal(ScalarType.Float32, lora.LoraA("default").grad!.dtype);
    }

    [Fact]
    public void PeftInitialisationAndScaling()
    {
        using var scope = NewDisposeScope();
        var lora = new LoraLinear(nn.Linear(400, 30, hasBias: false), new LoraOptions { Rank = 8, Alpha = 16 }, new Generator(1));
        var a = lora.LoraA("default");
        Assert.Equal(new long[] { 8, 400 }, a.shape);
        Assert.Equal(new long[] { 30, 8 }, lora.LoraB("default").shape);
        Assert.True(a.abs().max().item<float>() <= 1 / Math.Sqrt(400) + 1e-7);   // kaiming-uniform(a=√5) bound 1/√in
        Assert.True(a.abs().max().item<float>() > 0.9 / Math.Sqrt(400));
        Assert.Equal(0f, lora.LoraB("default").abs().sum().item<float>());
        Assert.Equal(2.0, lora.Scaling("default"));
        lora.AddAdapter(new LoraOptions { Rank = 16, Alpha = 16, UseRsLora = true, AdapterName = "rs", Init = "gaussian" }, new Generator(2));
        Assert.Equal(4.0, lora.Scaling("rs")); // alpha / √r
        double std = lora.LoraA("rs").std().item<float>();
        Assert.InRange(std, 1.0 / 16 * 0.9, 1.0 / 16 * 1.1); // N(0, 1/r) as PEFT: std 1/r
    }

    [Fact]
    public void MergedOutputEqualsUnmergedToBf16RoundingAndUnmergeRestores()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(4);
        var dense = nn.Linear(32, 16, hasBias: true, dtype: ScalarType.BFloat16);
        var lora = new LoraLinear(dense, new LoraOptions { Rank = 4, Alpha = 8 }, gen);
        using (no_grad()) lora.LoraB("default").normal_(0, 0.05, generator: gen);
        var original = dense.weight!.detach().to(ScalarType.Float32);
        var x = randn(5, 32, generator: gen).to(ScalarType.BFloat16);
        using var _ = no_grad();
        var unmerged = lora.forward(x).to(ScalarType.Float32);
        lora.Merge();
        var merged = lora.forward(x).to(ScalarType.Float32);
        Assert.Equal("default", lora.MergedAdapter);
        var tolerance = unmerged.abs().max().item<float>() * 4 * Math.Pow(2, -8); // a few bf16 ulps of the largest output
        Assert.True((merged - unmerged).abs().max().item<float>() <= tolerance);
        lora.Unmerge();
        Assert.True((dense.weight!.to(ScalarType.Float32) - original).abs().max().item<float>() <= 2 * Math.Pow(2, -8) * original.abs().max().item<float>());
        Assert.Throws<InvalidOperationException>(() => lora.Unmerge());
        var quantized = new LoraLinear(Linear4bit.Quantize(randn(16, 32)), new LoraOptions());
        Assert.Throws<InvalidOperationException>(() => quantized.Merge());
    }

    [Fact]
    public void AdaptersCanBeSwitchedAndDisabled()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(5);
        var baseLayer = Linear4bit.Quantize(randn(8, 16, generator: gen), computeDType: ScalarType.Float32);
        var lora = new LoraLinear(baseLayer, new LoraOptions { Rank = 2, AdapterName = "one" }, gen);
        lora.AddAdapter(new LoraOptions { Rank = 3, AdapterName = "two" }, gen);
        using var _ = no_grad();
        lora.LoraB("one").fill_(0.1);
        lora.LoraB("two").fill_(-0.2);
        var x = randn(4, 16, generator: gen);
        var plain = baseLayer.forward(x);
        Assert.Equal("two", lora.ActiveAdapter);
        var two = lora.forward(x);
        lora.SetAdapter("one");
        var one = lora.forward(x);
        Assert.False(one.allclose(two));
        Assert.True(one.allclose(plain + lora.DeltaWeight("one").matmul(x.t()).t(), 1e-4, 1e-5));
        lora.AdaptersDisabled = true;
        Assert.True(lora.forward(x).eq(plain).all().item<bool>());
        Assert.Throws<ArgumentException>(() => lora.SetAdapter("three"));
    }
}
