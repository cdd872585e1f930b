using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>Proves the native backend loads here (the GLIBCXX fix on Debian 12) and autograd computes a backward pass.</summary>
public class TorchSharpLoadTests
{
    [Fact]
    public void BackwardOfSumOfSquaresIsTwiceTheInput()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new double[] { 1.5, -2.0, 3.25 }, requires_grad: true);
        var loss = (x * x).sum();
        loss.backward();
        var g = x.grad!.data<double>().ToArray();
        Assert.Equal(new[] { 3.0, -4.0, 6.5 }, g);
    }

    [Fact]
    public void Bf16MatmulRunsOnCpu()
    {
        using var scope = NewDisposeScope();
        var a = ones(8, 8, dtype: ScalarType.BFloat16);
        var c = matmul(a, a).to(ScalarType.Float32);
        Assert.Equal(8f, c[3, 5].item<float>());
    }
}
