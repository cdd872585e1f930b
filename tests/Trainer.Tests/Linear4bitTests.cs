using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class Linear4bitTests
{
    [Theory]
    [InlineData(ScalarType.Float32, 1e-5)]
    [InlineData(ScalarType.BFloat16, 2e-2)]
    [InlineData(ScalarType.Float16, 2e-3)]
    public void ForwardAndInputGradientMatchAFloat64ReferenceOfTheDequantizedWeight(ScalarType compute, double tol)
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(1);
        var w = randn(48, 96, generator: gen) * 0.1;
        var bias = randn(48, generator: gen) * 0.1;
        using var layer = Linear4bit.Quantize(w, bias, compute);
        // Independent reference weight: the scalar reference dequantizer of src/Quant, in float64.
        var q = FourBitQuantizer.Quantize(w.contiguous().bytes, FloatType.Float32, [48, 96]);
        var wRef = new float[48 * 96];
        FourBitReferenceDequantizer.Dequantize(q, FloatType.Float32, System.Runtime.InteropServices.MemoryMarshal.AsBytes(wRef.AsSpan()));
        var w64 = tensor(wRef.Select(v => (double)v).ToArray()).reshape(48, 96);

        var x = (randn(3, 5, 96, generator: gen)).to(compute).requires_grad_(true);
        var y = layer.forward(x);
        Assert.Equal(compute, y.dtype);
        var gy = randn(3, 5, 48, generator: gen);
        y.backward([gy.to(compute)]);

        var x64 = x.detach().to(ScalarType.Float64);
        var yRef = x64.matmul(w64.t()) + bias.to(ScalarType.Float64).to(compute).to(ScalarType.Float64);
        var gxRef = gy.to(compute).to(ScalarType.Float64).matmul(w64);
        Assert.True(RelErr(y, yRef) < tol, $"forward rel err {RelErr(y, yRef)}");
        Assert.True(RelErr(x.grad!, gxRef) < tol, $"grad rel err {RelErr(x.grad!, gxRef)}");
    }

    [Fact]
    public void TheFrozenWeightGetsNoGradientAndIsNotAParameter()
    {
        using var scope = NewDisposeScope();
        using var layer = Linear4bit.Quantize(randn(16, 32) * 0.1);
        Assert.Empty(layer.parameters());
        Assert.Contains(layer.named_buffers(), b => b.name == "weight" && b.buffer.dtype == ScalarType.Byte);
        var x = randn(4, 32).to(ScalarType.BFloat16).requires_grad_(true);
        layer.forward(x).sum().backward();
        Assert.NotNull(x.grad);
        Assert.All(layer.buffers(), b => Assert.Null(b.grad));
    }

    [Fact]
    public void DequantizeEqualsTheReferenceBitForBit()
    {
        using var scope = NewDisposeScope();
        var w = randn(33, 64) * 0.05;
        using var layer = Linear4bit.Quantize(w, blocksize: 32);
        var q = FourBitQuantizer.Quantize(w.contiguous().bytes, FloatType.Float32, [33, 64], QuantType.Nf4, 32, true);
        var expected = new byte[33 * 64 * 2];
        FourBitReferenceDequantizer.Dequantize(q, FloatType.BFloat16, expected);
        var actual = layer.Dequantize(ScalarType.BFloat16);
        Assert.Equal(expected, actual.bytes.ToArray());
    }

    internal static double RelErr(Tensor actual, Tensor expected)
    {
        var a = actual.detach().to(ScalarType.Float64);
        return (a - expected).norm().item<double>() / expected.norm().item<double>();
    }
}
