namespace QLora.Quant;

/// <summary>
/// Double quantization of a 4-bit tensor's absmax, exactly as bitsandbytes: offset = mean (in double, rounded to
/// float32), then 8-bit blockwise quantization of <c>absmax − offset</c> with the signed dynamic map, 256 per block.
/// </summary>
public static class DoubleQuantizer
{
    /// <summary>The nested blocksize every bitsandbytes checkpoint uses.</summary>
    public const int NestedBlocksize = 256;

    /// <summary>The offset double quantization subtracts: the mean of the absmax, summed in double, rounded to float32.</summary>
    public static float Offset(ReadOnlySpan<float> absmax)
    {
        double sum = 0;
        foreach (var a in absmax) sum += a;
        return absmax.Length == 0 ? 0f : (float)(sum / absmax.Length);
    }

    /// <summary>Quantizes <paramref name="absmax"/> into a <see cref="NestedAbsmax"/> using the canonical signed map.</summary>
    public static NestedAbsmax Quantize(ReadOnlySpan<float> absmax)
    {
        float offset = Offset(absmax);

        var map = DynamicMap.Signed;
        int nBlocks = (absmax.Length + NestedBlocksize - 1) / NestedBlocksize;
        var codes = new byte[absmax.Length];
        var absmax2 = new float[nBlocks];
        Span<float> d = stackalloc float[NestedBlocksize];
        for (int b = 0; b < nBlocks; b++)
        {
            int start = b * NestedBlocksize, len = Math.Min(NestedBlocksize, absmax.Length - start);
            float m = 0f;
            for (int i = 0; i < len; i++)
            {
                d[i] = absmax[start + i] - offset;
                float a = MathF.Abs(d[i]);
                if (a > m) m = a;
            }
            absmax2[b] = m;
            float inv = 1.0f / m;
            for (int i = 0; i < len; i++)
                codes[start + i] = DynamicMap.Nearest(map, d[i] * inv); // m = 0 gives NaN, hence code 0, as bitsandbytes
        }
        return new NestedAbsmax { Codes = codes, Absmax = absmax2, Offset = offset, Map = map.ToArray(), Blocksize = NestedBlocksize };
    }
}
