namespace QLora.Quant;

/// <summary>bitsandbytes' FP4 table (bit 3 = sign) and its CUDA quantizer's decision tree, literal for literal.</summary>
public static class Fp4Codebook
{
    /// <summary>The code of +0.0.</summary>
    public const byte ZeroCode = 0;

    private static readonly float[] ValuesArray =
    [
        0f / 12, 0.0625f / 12, 8f / 12, 12f / 12, 4f / 12, 6f / 12, 2f / 12, 3f / 12,
        -0f / 12, -0.0625f / 12, -8f / 12, -12f / 12, -4f / 12, -6f / 12, -2f / 12, -3f / 12,
    ];

    /// <summary>The 16 values, indexed by code (bit pattern order, not ascending).</summary>
    public static ReadOnlySpan<float> Values => ValuesArray;

    /// <summary>The code bitsandbytes' CUDA kernel gives a value scaled into [-1, 1]; NaN gives code 0.</summary>
    public static byte Encode(float x)
    {
        int sign = x < 0 ? 8 : 0;
        float a = MathF.Abs(x);
        int code;
        if (a > 0.29166667f)
            code = a > 0.583333f ? (a > 0.8333333f ? 3 : 2) : (a > 0.4166667f ? 5 : 4);
        else
            code = a > 0.0859375f ? (a > 0.20833333f ? 7 : 6) : (a > 0.00260417f ? 1 : 0);
        return (byte)(code + sign);
    }
}
