using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Llama's RMSNorm (HF naming: <c>weight</c>): normalised in float32, cast back, then scaled. Frozen. Gemma's variant
/// (<see cref="UnitOffset"/>) scales by (1 + weight) and stays in float32 until the end, as transformers' GemmaRMSNorm does.
/// </summary>
public sealed class RmsNorm : FrozenWeightModule
{
    private readonly double _eps;

    /// <summary>A norm over the last dimension of size <paramref name="size"/>, weight initialised to ones.</summary>
    public RmsNorm(long size, double eps, ScalarType dtype) : this(size, eps, dtype, unitOffset: false) { }

    /// <summary>As the Llama norm, or Gemma's (1 + weight) norm when <paramref name="unitOffset"/>.</summary>
    public RmsNorm(long size, double eps, ScalarType dtype, bool unitOffset) : base("RmsNorm", ones(size, dtype: dtype))
    {
        _eps = eps;
        UnitOffset = unitOffset;
    }

    /// <summary>Gemma's form: float32 x / √(mean(x²) + eps) · (1 + weight), then cast to the input dtype.</summary>
    public bool UnitOffset { get; }

    /// <summary>weight · (x / √(mean(x²) + eps)), the division in float32.</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var x32 = x.to(ScalarType.Float32);
        var variance = x32.pow(2).mean([-1L], keepdim: true);
        if (UnitOffset)
            return (x32 * torch.rsqrt(variance + _eps) * (weight.to(ScalarType.Float32) + 1.0)).to(x.dtype).MoveToOuterDisposeScope();
        var normed = (x32 * torch.rsqrt(variance + _eps)).to(x.dtype);
        return (weight.to(x.dtype) * normed).MoveToOuterDisposeScope();
    }
}
