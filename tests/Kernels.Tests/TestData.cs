using QLora.Quant;

namespace QLora.Kernels.Tests;

/// Deterministic inputs for the kernel tests.
public static class TestData
{
    /// Normal-ish values with, when <paramref name="specials"/>, an all-zero first block, NaN and ±inf elements.
    public static float[] Weights(int count, int blocksize, int seed, bool specials)
    {
        var rng = new Random(seed);
        var x = new float[count];
        for (int i = 0; i < count; i++)
            x[i] = (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()) * 0.02);
        if (specials)
        {
            Array.Clear(x, 0, Math.Min(blocksize, count));
            if (count > blocksize + 3) x[blocksize + 3] = float.NaN;
            if (count > 2 * blocksize + 1) x[2 * blocksize + 1] = float.PositiveInfinity;
            if (count > 2 * blocksize + 2) x[2 * blocksize + 2] = float.NegativeInfinity;
        }
        return x;
    }

    public static QuantizedTensor Quantize(int count, int blocksize, QuantType type, bool doubleQuant, bool specials, int seed = 1) =>
        FourBitQuantizer.Quantize(Weights(count, blocksize, seed, specials), [count], type, blocksize, doubleQuant);
}
