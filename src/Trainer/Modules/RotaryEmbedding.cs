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

    /// <summary>x·cos + rotate_half(x)·sin for x of shape [B, heads, T, d] and cos/sin [B, T, d].</summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        long half = x.shape[^1] / 2;
        var x1 = x.narrow(-1, 0, half);
        var x2 = x.narrow(-1, half, half);
        var rotated = cat([-x2, x1], -1);
        var c = cos.unsqueeze(1);
        var s = sin.unsqueeze(1);
        return (x * c + rotated * s).MoveToOuterDisposeScope();
    }
}
