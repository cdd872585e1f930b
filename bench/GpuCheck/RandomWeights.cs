using QLora.Quant;

namespace QLora.GpuCheck;

/// <summary>Random NF4 weights with double quantization, built directly from random codes (every code and absmax code occurs).</summary>
internal static class RandomWeights
{
    /// <summary>A rows×cols NF4 tensor, blocksize 64, double-quantized with the canonical signed map.</summary>
    public static QuantizedTensor Nf4DoubleQuant(int rows, int cols, int seed)
    {
        var rng = new Random(seed);
        long n = (long)rows * cols;
        long blocks = (n + 63) / 64;
        var packed = new byte[(n + 1) / 2];
        rng.NextBytes(packed);
        var codes = new byte[blocks];
        rng.NextBytes(codes);
        var absmax2 = new float[(blocks + 255) / 256];
        for (int i = 0; i < absmax2.Length; i++) absmax2[i] = 0.001f + 0.05f * rng.NextSingle();
        var state = new QuantState
        {
            QuantType = QuantType.Nf4, Blocksize = 64, DType = FloatType.BFloat16, Shape = [rows, cols],
            Nested = new NestedAbsmax
            {
                Codes = codes, Absmax = absmax2, Offset = 0.02f + 0.02f * rng.NextSingle(), Map = DynamicMap.Signed.ToArray(), Blocksize = 256,
            },
        };
        return new QuantizedTensor(packed, state);
    }

    /// <summary>Bytes a dequantization reads: packed codes, absmax codes, nested absmax and map.</summary>
    public static long BytesRead(QuantizedTensor t) =>
        t.Packed.LongLength + t.State.Nested!.Codes.LongLength + t.State.Nested.Absmax.LongLength * 4 + 256 * 4;
}
