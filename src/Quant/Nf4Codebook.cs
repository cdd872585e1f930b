namespace QLora.Quant;

/// <summary>The NF4 table and encoder exactly as bitsandbytes defines them (hard-coded float32 values, not recomputed quantiles).</summary>
public static class Nf4Codebook
{
    /// <summary>The code of 0.0.</summary>
    public const byte ZeroCode = 7;

    private static readonly float[] ValuesArray =
    [
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
    ];

    private static readonly float[] ThresholdsArray =
    [
        -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
        -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
        0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
        0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f,
    ];

    /// <summary>The 16 values, indexed by code, ascending.</summary>
    public static ReadOnlySpan<float> Values => ValuesArray;

    /// <summary>The 15 decision thresholds: a value's code is how many of them it strictly exceeds.</summary>
    public static ReadOnlySpan<float> Thresholds => ThresholdsArray;

    /// <summary>Nearest code of a value scaled into [-1, 1]; ties go to the lower code, NaN gives code 0.</summary>
    public static byte Encode(float x)
    {
        // Branch-free count of thresholds exceeded; every comparison is false for NaN.
        var t = ThresholdsArray;
        int c = 0;
        for (int i = 0; i < t.Length; i++) c += x > t[i] ? 1 : 0;
        return (byte)c;
    }
}
