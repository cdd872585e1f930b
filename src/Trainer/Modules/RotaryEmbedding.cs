using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Rotary position embeddings as transformers computes them: inverse frequencies from rope_theta (with Llama 3.1's
/// "llama3" or "linear" rope_scaling), cos/sin of positions × frequencies in float32, and rotate-half application.
/// </summary>
public sealed class RotaryEmbedding
{
    private readonly float[] _invFreq;

    /// <summary>Frequencies for head dimension <paramref name="headDim"/>.</summary>
    public RotaryEmbedding(int headDim, double theta, RopeScaling? scaling)
    {
        _invFreq = InverseFrequencies(headDim, theta, scaling);
    }

    /// <summary>The inverse frequencies (float32, as transformers holds them).</summary>
    public IReadOnlyList<float> InvFreq => _invFreq;

    /// <summary>transformers' computation: 1 / θ^(2i/d) in float32, then the rope_scaling rule.</summary>
    public static float[] InverseFrequencies(int headDim, double theta, RopeScaling? scaling)
    {
        int half = headDim / 2;
        var inv = new float[half];
        for (int i = 0; i < half; i++)
        {
            // torch: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in float32
            float exponent = (float)(2 * i) / headDim;
            inv[i] = 1.0f / MathF.Pow((float)theta, exponent);
        }
        if (scaling is null || scaling.Type == "default") return inv;
        if (scaling.Type == "linear")
        {
            for (int i = 0; i < half; i++) inv[i] = (float)(inv[i] / scaling.Factor);
            return inv;
        }
        // llama3: keep high frequencies, divide low ones by factor, interpolate in between.
        double lowWavelen = scaling.OriginalMaxPositionEmbeddings / scaling.LowFreqFactor;
        double highWavelen = scaling.OriginalMaxPositionEmbeddings / scaling.HighFreqFactor;
        for (int i = 0; i < half; i++)
        {
            double wavelen = 2 * Math.PI / inv[i];
            if (wavelen < highWavelen) continue;
            if (wavelen > lowWavelen) { inv[i] = (float)(inv[i] / scaling.Factor); continue; }
            double smooth = (scaling.OriginalMaxPositionEmbeddings / wavelen - scaling.LowFreqFactor) / (scaling.HighFreqFactor - scaling.LowFreqFactor);
            inv[i] = (float)((1 - smooth) * inv[i] / scaling.Factor + smooth * inv[i]);
        }
        return inv;
    }

    /// <summary>cos and sin of shape [B, T, headDim] in <paramref name="dtype"/> for positions [B, T].</summary>
    public (Tensor Cos, Tensor Sin) CosSin(Tensor positionIds, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var inv = tensor(_invFreq, device: positionIds.device);
        var freqs = positionIds.to(ScalarType.Float32).unsqueeze(-1) * inv; // [B, T, d/2]
        var emb = cat([freqs, freqs], -1);
        return (emb.cos().to(dtype).MoveToOuterDisposeScope(), emb.sin().to(dtype).MoveToOuterDisposeScope());
    }

    /// <summary>
    /// x·cos + rotate_half(x)·sin for x of shape [B, heads, T, d] and cos/sin [B, T, d], one head at a time into one
    /// output laid out as x is, through its own autograd node: the backward is the same rotation transposed,
    /// g·cos + rotate_half_T(g·sin) with rotate_half_T(u) = [u₂, −u₁], also a head at a time. The same operations as the
    /// whole-tensor formula element by element (so the same values, bit for bit), with temporaries of one head instead
    /// of four of the whole query: at long context those were among a layer's largest tensors.
    /// </summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin) =>
        is_grad_enabled() && x.requires_grad ? RopeFunction.apply(x, cos, sin) : Rotate(x, cos, sin, transpose: false);

    // The rotation (or its transpose) of every head of x, a head at a time.
    private static Tensor Rotate(Tensor x, Tensor cos, Tensor sin, bool transpose)
    {
        using var scope = NewDisposeScope();
        long half = x.shape[^1] / 2;
        var y = empty_like(x); // preserves x's layout, as the element-wise formula's output does
        var c = cos.unsqueeze(1);
        var s = sin.unsqueeze(1);
        for (long head = 0; head < x.shape[1]; head++)
        {
            using var headScope = NewDisposeScope();
            var xh = x.narrow(1, head, 1);
            if (!transpose)
            {
                var rotated = cat([-xh.narrow(-1, half, half), xh.narrow(-1, 0, half)], -1);
                y.narrow(1, head, 1).copy_(xh * c + rotated * s);
            }
            else
            {
                var u = xh * s;
                var rotated = cat([u.narrow(-1, half, half), -u.narrow(-1, 0, half)], -1);
                y.narrow(1, head, 1).copy_(xh * c + rotated);
            }
        }
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>RoPE's autograd node: saves only cos and sin (x is not needed: the map is linear in x).</summary>
    private sealed class RopeFunction : torch.autograd.SingleTensorFunction<RopeFunction>
    {
        public override string Name => "RopeBackward";

        public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            var x = (Tensor)vars[0];
            ctx.set_materialize_grads(false); // as Linear4bit: no cached output is touched in backward
            ctx.save_data("thread", Environment.CurrentManagedThreadId);
            ctx.save_for_backward([(Tensor)vars[1], (Tensor)vars[2]]);
            return Rotate(x, (Tensor)vars[1], (Tensor)vars[2], transpose: false);
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
        {
            if (grad.IsInvalid) return [null!, null!, null!];
            try
            {
                var saved = ctx.get_saved_variables();
                var gx = Rotate(grad, saved[0], saved[1], transpose: true);
                grad.Dispose(); // our handles: autograd keeps what it still needs
                foreach (var t in saved) t.Dispose();
                return [gx, null!, null!];
            }
            catch (Exception e)
            {
                Checkpoint.RecordFailure(e, ctx.get_data("thread") as int?);
                return [null!, null!, null!];
            }
        }
    }
}
