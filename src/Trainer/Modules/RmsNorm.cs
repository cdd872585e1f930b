using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>Llama's RMSNorm (HF naming: <c>weight</c>): normalised in float32, cast back, then scaled. Frozen.</summary>
public sealed class RmsNorm : FrozenWeightModule
{
    private readonly double _eps;

    /// <summary>A norm over the last dimension of size <paramref name="size"/>, weight initialised to ones.</summary>
    public RmsNorm(long size, double eps, ScalarType dtype) : base("RmsNorm", ones(size, dtype: dtype))
    {
        _eps = eps;
    }

    /// <summary>weight · (x / √(mean(x²) + eps)), the division in float32.</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var x32 = x.to(ScalarType.Float32);
        var variance = x32.pow(2).mean([-1L], keepdim: true);
        var normed = (x32 * torch.rsqrt(variance + _eps)).to(x.dtype);
        return (weight.to(x.dtype) * normed).MoveToOuterDisposeScope();
    }
}
