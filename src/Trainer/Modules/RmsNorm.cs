using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Llama's RMSNorm (HF naming: <c>weight</c>): normalised in float32, cast back, then scaled. Frozen. Gemma's variant
/// (<see cref="UnitOffset"/>) scales by (1 + weight) and stays in float32 until the end, as transformers' GemmaRMSNorm does.
/// With <see cref="TileTokens"/> it runs in token tiles through its own autograd node, which saves the input as it is
/// and one float32 scale per token instead of a float32 copy of the input, and computes the gradient tile by tile: at
/// long context the plain form's float32 copies (four of them in backward) are the largest tensors of a layer.
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

    /// <summary>
    /// Tokens per tile (0: off, the plain form, whose backward autograd derives). Tiled, the output equals the plain
    /// form's and the input gradient agrees with autograd's up to float32 rounding before its cast to the input dtype.
    /// </summary>
    public int TileTokens { get; set; }

    /// <summary>weight · (x / √(mean(x²) + eps)), the division in float32.</summary>
    public override Tensor forward(Tensor x)
    {
        if (TileTokens > 0 && x.numel() / Math.Max(1, x.shape[^1]) > TileTokens)
        {
            if (is_grad_enabled() && x.requires_grad) return TiledRmsNormFunction.apply(x, this);
            using (no_grad()) return Tiled(x, null);
        }
        using var scope = NewDisposeScope();
        var x32 = x.to(ScalarType.Float32);
        Tensor variance, normed;
        using (var square = x32.pow(2)) variance = square.mean([-1L], keepdim: true);
        if (UnitOffset)
            return (x32 * torch.rsqrt(variance + _eps) * (weight.to(ScalarType.Float32) + 1.0)).to(x.dtype).MoveToOuterDisposeScope();
        using (var inverse = torch.rsqrt(variance + _eps))
        using (var product = x32 * inverse)
            normed = product.to(x.dtype);
        if (x32.dtype != x.dtype) x32.Dispose(); // the float32 copy (autograd keeps it when it needs it)
        return (weight.to(x.dtype) * normed).MoveToOuterDisposeScope();
    }

    /// <summary>The norm tile by tile, into one output of x's shape and dtype; the float32 scale per token goes to <paramref name="scales"/> when given ([tokens, 1]).</summary>
    private Tensor Tiled(Tensor x, Tensor? scales)
    {
        using var scope = NewDisposeScope();
        long width = x.shape[^1], tokens = x.numel() / width;
        using var flat = x.reshape(-1, width);
        var y = empty_like(flat);
        using var offset = UnitOffset ? weight.to(ScalarType.Float32) + 1.0 : null;
        using var scaleWeight = UnitOffset ? null : weight.to(x.dtype);
        for (long start = 0; start < tokens; start += TileTokens)
        {
            using var tileScope = NewDisposeScope();
            long length = Math.Min(TileTokens, tokens - start);
            var x32 = flat.narrow(0, start, length).to(ScalarType.Float32);
            var inverse = torch.rsqrt(x32.pow(2).mean([-1L], keepdim: true) + _eps);
            scales?.narrow(0, start, length).copy_(inverse);
            var normed = x32 * inverse;
            y.narrow(0, start, length).copy_(UnitOffset ? normed * offset! : scaleWeight! * normed.to(x.dtype));
        }
        return y.view(x.shape).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The tiled norm's autograd node. Saves x and the per-token scale r = 1/√(mean(x²) + eps); backward, per tile, with
    /// g the output gradient through the weight in float32 (Llama: g·w in x's dtype, widened, as autograd orders it;
    /// Gemma: g·(1 + w) in float32): dx = r·g − x·r³·mean(g·x) (the derivative of x·r, r's dependence on x included).
    /// </summary>
    private sealed class TiledRmsNormFunction : torch.autograd.SingleTensorFunction<TiledRmsNormFunction>
    {
        public override string Name => "TiledRmsNormBackward";

        public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            var x = (Tensor)vars[0];
            var norm = (RmsNorm)vars[1];
            ctx.set_materialize_grads(false); // as Linear4bit: no cached output is touched in backward
            ctx.save_data("norm", norm);
            ctx.save_data("thread", Environment.CurrentManagedThreadId);
            // not disposed here: TorchSharp takes the saved tensors only after forward returns (the caller's scope frees the handle)
            var scales = empty([x.numel() / x.shape[^1], 1], dtype: ScalarType.Float32, device: x.device);
            var y = norm.Tiled(x, scales);
            ctx.save_for_backward([x, scales]);
            return y;
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
        {
            ReturnedGradients.Release();
            if (grad.IsInvalid) return [null!, null!];
            try
            {
                var norm = (RmsNorm)ctx.get_data("norm");
                var saved = ctx.get_saved_variables();
                var x = saved[0];
                var scales = saved[1];
                using var scope = NewDisposeScope();
                long width = x.shape[^1], tokens = x.numel() / width;
                var flat = x.reshape(-1, width);
                var gradFlat = grad.reshape(-1, width);
                var gx = empty_like(flat);
                var offset = norm.UnitOffset ? norm.weight.to(ScalarType.Float32) + 1.0 : null;
                var scaleWeight = norm.UnitOffset ? null : norm.weight.to(x.dtype);
                for (long start = 0; start < tokens; start += norm.TileTokens)
                {
                    using var tileScope = NewDisposeScope();
                    long length = Math.Min(norm.TileTokens, tokens - start);
                    var g = gradFlat.narrow(0, start, length);
                    var g32 = norm.UnitOffset ? g.to(ScalarType.Float32) * offset! : (g * scaleWeight!).to(ScalarType.Float32);
                    var x32 = flat.narrow(0, start, length).to(ScalarType.Float32);
                    var r = scales.narrow(0, start, length);
                    var dot = (g32 * x32).mean([-1L], keepdim: true);
                    gx.narrow(0, start, length).copy_(g32 * r - x32 * (r.pow(3) * dot));
                }
                var result = gx.view(x.shape).MoveToOuterDisposeScope();
                grad.Dispose(); // our handles on the output gradient and the saved tensors: autograd keeps what it still needs
                foreach (var t in saved) t.Dispose();
                ctx.Dispose(); // TorchSharp's node keeps what it saved until the node goes (inside a checkpoint: the layer's whole backward)
                return ReturnedGradients.Keep([result, null!]);
            }
            catch (Exception e)
            {
                Checkpoint.RecordFailure(e, ctx.get_data("thread") as int?);
                return [null!, null!];
            }
        }
    }
}
