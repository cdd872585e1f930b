using System.Buffers.Binary;

namespace QLora.Quant.Gguf;

/// <summary>
/// ggml's reference block quantizers (the <c>quantize_row_*_ref</c> functions llama.cpp's quantizer runs when no
/// importance matrix is given), re-implemented from the published algorithms with the same float32 arithmetic,
/// rounding (<c>roundf</c>, round-to-nearest-even <c>nearest_int</c>, truncating casts) and block layouts, so the bytes
/// are the ones llama.cpp would write. Rows are quantized independently; every row must hold whole blocks.
/// </summary>
public static class GgmlQuantizer
{
    private const int QK = 32;
    private const int QKK = 256;
    private const float GroupMaxEps = 1e-15f;

    /// <summary>
    /// Converts or quantizes <paramref name="source"/> (whole rows of float32, row length <paramref name="columns"/>) to
    /// <paramref name="type"/>, writing <c>type.RowBytes(columns) × rows</c> bytes to <paramref name="destination"/>.
    /// </summary>
    public static void Quantize(GgmlType type, ReadOnlySpan<float> source, long columns, Span<byte> destination)
    {
        if (columns <= 0 || source.Length % columns != 0) throw new ArgumentException($"{source.Length} values are not whole rows of {columns}", nameof(source));
        long rows = source.Length / columns;
        long rowBytes = type.RowBytes(columns);
        if (destination.Length != rowBytes * rows) throw new ArgumentException($"{type.Name()} needs {rowBytes * rows} bytes, got {destination.Length}", nameof(destination));
        switch (type)
        {
            case GgmlType.F32:
                for (int i = 0; i < source.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(destination[(4 * i)..], source[i]);
                break;
            case GgmlType.F16:
                for (int i = 0; i < source.Length; i++) BinaryPrimitives.WriteHalfLittleEndian(destination[(2 * i)..], (Half)source[i]);
                break;
            case GgmlType.BF16:
                for (int i = 0; i < source.Length; i++) BinaryPrimitives.WriteUInt16LittleEndian(destination[(2 * i)..], BFloat16.FromFloat(source[i]));
                break;
            default:
                // Blocks never straddle rows (rows hold whole blocks), so the row-major data is one run of blocks.
                int block = type.BlockSize(), bytes = type.BlockBytes();
                for (int b = 0; b < source.Length / block; b++)
                {
                    var x = source.Slice(b * block, block);
                    var y = destination.Slice(b * bytes, bytes);
                    switch (type)
                    {
                        case GgmlType.Q8_0: BlockQ8_0(x, y); break;
                        case GgmlType.Q4_0: BlockQ4_0(x, y); break;
                        case GgmlType.Q5_0: BlockQ5_0(x, y); break;
                        case GgmlType.Q4_K: BlockQ4_K(x, y); break;
                        case GgmlType.Q5_K: BlockQ5_K(x, y); break;
                        case GgmlType.Q6_K: BlockQ6_K(x, y); break;
                        default: throw new ArgumentOutOfRangeException(nameof(type), type, "no quantizer");
                    }
                }
                break;
        }
    }

    /// <summary>q8_0: d = max|x|/127 (fp16), q = roundf(x/d) (ties away from zero).</summary>
    internal static void BlockQ8_0(ReadOnlySpan<float> x, Span<byte> y)
    {
        float amax = 0;
        for (int j = 0; j < QK; j++) amax = MathF.Max(amax, MathF.Abs(x[j]));
        float d = amax / 127;
        float id = d != 0 ? 1.0f / d : 0.0f;
        WriteHalf(y, 0, d);
        for (int j = 0; j < QK; j++) y[2 + j] = (byte)(sbyte)MathF.Round(x[j] * id, MidpointRounding.AwayFromZero);
    }

    /// <summary>q4_0: d = (the value of largest magnitude)/−8, q = min(15, trunc(x/d + 8.5)); element j and j+16 share a byte.</summary>
    internal static void BlockQ4_0(ReadOnlySpan<float> x, Span<byte> y)
    {
        float d = LargestMagnitude(x) / -8;
        float id = d != 0 ? 1.0f / d : 0.0f;
        WriteHalf(y, 0, d);
        for (int j = 0; j < QK / 2; j++)
        {
            int xi0 = Math.Min(15, TruncToInt8(x[j] * id + 8.5f));
            int xi1 = Math.Min(15, TruncToInt8(x[QK / 2 + j] * id + 8.5f));
            y[2 + j] = (byte)(xi0 | (xi1 << 4));
        }
    }

    /// <summary>q5_0: d = (the value of largest magnitude)/−16, q = min(31, trunc(x/d + 16.5)); low nibbles as q4_0, fifth bits in a uint32.</summary>
    internal static void BlockQ5_0(ReadOnlySpan<float> x, Span<byte> y)
    {
        float d = LargestMagnitude(x) / -16;
        float id = d != 0 ? 1.0f / d : 0.0f;
        WriteHalf(y, 0, d);
        uint qh = 0;
        for (int j = 0; j < QK / 2; j++)
        {
            int xi0 = Math.Min(31, TruncToInt8(x[j] * id + 16.5f));
            int xi1 = Math.Min(31, TruncToInt8(x[QK / 2 + j] * id + 16.5f));
            y[6 + j] = (byte)((xi0 & 0x0F) | ((xi1 & 0x0F) << 4));
            qh |= (uint)((xi0 & 0x10) >> 4) << j;
            qh |= (uint)((xi1 & 0x10) >> 4) << (j + QK / 2);
        }
        BinaryPrimitives.WriteUInt32LittleEndian(y[2..], qh);
    }

    /// <summary>
    /// q4_K: each sub-block of 32 gets a scale and a min from a weighted least-squares search over 21 candidate scales
    /// (<c>make_qkx2_quants</c>, weights av|x| + |x|); scales and mins are quantized to 6 bits against the block's
    /// largest, then the codes are recomputed from the stored (rounded) scales.
    /// </summary>
    internal static void BlockQ4_K(ReadOnlySpan<float> x, Span<byte> y)
    {
        Span<byte> L = stackalloc byte[QKK];
        ScalesAndMinsK(x, y, L, nmax: 15, rmin: -1f, nstep: 20);
        var q = y.Slice(16, 128);
        for (int j = 0, o = 0; j < QKK; j += 64, o += 32)
            for (int l = 0; l < 32; l++) q[o + l] = (byte)(L[j + l] | (L[j + l + 32] << 4));
    }

    /// <summary>
    /// q5_K: as q4_K with 32 levels (<c>make_qkx2_quants</c> with rmin −0.5 and 16 candidates); low nibbles in qs[128],
    /// the fifth bits in qh[32] (bit 2k / 2k+1 for the k-th pair of sub-blocks).
    /// </summary>
    internal static void BlockQ5_K(ReadOnlySpan<float> x, Span<byte> y)
    {
        Span<byte> L = stackalloc byte[QKK];
        ScalesAndMinsK(x, y, L, nmax: 31, rmin: -0.5f, nstep: 15);
        var qh = y.Slice(16, 32);
        var ql = y.Slice(48, 128);
        qh.Clear();
        byte m1 = 1, m2 = 2;
        for (int n = 0, o = 0; n < QKK; n += 64, o += 32)
        {
            for (int j = 0; j < 32; j++)
            {
                int l1 = L[n + j];
                if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                int l2 = L[n + j + 32];
                if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                ql[o + j] = (byte)(l1 | (l2 << 4));
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    }

    // The shared part of q4_K and q5_K: per-sub-block fits, 6-bit scales/mins in y[4..16], d and dmin in y[0..4],
    // and the final codes L recomputed from the stored scales.
    private static void ScalesAndMinsK(ReadOnlySpan<float> x, Span<byte> y, Span<byte> L, int nmax, float rmin, int nstep)
    {
        Span<byte> laux = stackalloc byte[32];
        Span<float> weights = stackalloc float[32];
        Span<float> mins = stackalloc float[QKK / 32];
        Span<float> scales = stackalloc float[QKK / 32];
        float maxScale = 0, maxMin = 0;
        for (int j = 0; j < QKK / 32; j++)
        {
            var xs = x.Slice(32 * j, 32);
            float sumX2 = 0;
            for (int l = 0; l < 32; l++) sumX2 += xs[l] * xs[l];
            float avX = MathF.Sqrt(sumX2 / 32);
            for (int l = 0; l < 32; l++) weights[l] = avX + MathF.Abs(xs[l]);
            scales[j] = MakeQkx2Quants(32, nmax, xs, weights, L.Slice(32 * j, 32), out mins[j], laux, rmin, 0.1f, nstep);
            if (scales[j] > maxScale) maxScale = scales[j];
            if (mins[j] > maxMin) maxMin = mins[j];
        }
        var sc = y.Slice(4, 12);
        sc.Clear();
        float invScale = maxScale > 0 ? 63f / maxScale : 0f;
        float invMin = maxMin > 0 ? 63f / maxMin : 0f;
        for (int j = 0; j < QKK / 32; j++)
        {
            byte ls = Math.Min((byte)63, unchecked((byte)NearestInt(invScale * scales[j])));
            byte lm = Math.Min((byte)63, unchecked((byte)NearestInt(invMin * mins[j])));
            if (j < 4)
            {
                sc[j] = ls;
                sc[j + 4] = lm;
            }
            else
            {
                sc[j + 4] = (byte)((ls & 0xF) | ((lm & 0xF) << 4));
                sc[j - 4] |= (byte)((ls >> 4) << 6);
                sc[j] |= (byte)((lm >> 4) << 6);
            }
        }
        WriteHalf(y, 0, maxScale / 63f);
        WriteHalf(y, 2, maxMin / 63f);
        float dAll = ReadHalf(y, 0), dminAll = ReadHalf(y, 2);
        for (int j = 0; j < QKK / 32; j++)
        {
            ScaleMinK4(j, sc, out byte s, out byte m);
            float d = dAll * s;
            if (d == 0) continue;
            float dm = dminAll * m;
            for (int ii = 0; ii < 32; ii++)
            {
                int l = NearestInt((x[32 * j + ii] + dm) / d);
                L[32 * j + ii] = (byte)Math.Clamp(l, 0, nmax);
            }
        }
    }

    /// <summary>
    /// q6_K: each sub-block of 16 gets a signed scale from <c>make_qx_quants</c> (nmax 32, x²-weighted search over 19
    /// candidates); the scales are stored as int8 against the block's largest, the codes recomputed from them.
    /// Layout: ql[128] (low nibbles), qh[64] (high two bits), scales[16], d (fp16).
    /// </summary>
    internal static void BlockQ6_K(ReadOnlySpan<float> x, Span<byte> y)
    {
        Span<sbyte> L = stackalloc sbyte[QKK];
        Span<float> scales = stackalloc float[QKK / 16];
        float maxScale = 0, maxAbsScale = 0;
        for (int ib = 0; ib < QKK / 16; ib++)
        {
            float scale = MakeQxQuants(16, 32, x.Slice(16 * ib, 16), L.Slice(16 * ib, 16));
            scales[ib] = scale;
            float abs = MathF.Abs(scale);
            if (abs > maxAbsScale) { maxAbsScale = abs; maxScale = scale; }
        }
        y.Clear();
        if (maxAbsScale < GroupMaxEps) return; // all-zero block: every byte 0 (d = +0)
        float iscale = -128f / maxScale;
        WriteHalf(y, 208, 1 / iscale);
        var scOut = y.Slice(192, 16);
        for (int ib = 0; ib < QKK / 16; ib++) scOut[ib] = unchecked((byte)(sbyte)Math.Min(127, NearestInt(iscale * scales[ib])));
        float dAll = ReadHalf(y, 208);
        for (int j = 0; j < QKK / 16; j++)
        {
            float d = dAll * (sbyte)scOut[j];
            if (d == 0) continue;
            for (int ii = 0; ii < 16; ii++)
            {
                int l = NearestInt(x[16 * j + ii] / d);
                L[16 * j + ii] = (sbyte)(Math.Clamp(l, -32, 31) + 32);
            }
        }
        var ql = y[..128];
        var qh = y.Slice(128, 64);
        for (int j = 0, o = 0, h = 0; j < QKK; j += 128, o += 64, h += 32)
        {
            for (int l = 0; l < 32; l++)
            {
                int q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF, q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                ql[o + l] = (byte)(q1 | (q3 << 4));
                ql[o + l + 32] = (byte)(q2 | (q4 << 4));
                qh[h + l] = (byte)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
            }
        }
    }

    /// <summary>
    /// ggml's <c>make_qkx2_quants</c>: an asymmetric n-level fit (scale, min ≤ 0) minimising the weighted squared error,
    /// trying the plain min/max fit and <paramref name="nstep"/>+1 rescaled candidates, each refined by least squares.
    /// Returns the scale; <paramref name="theMin"/> is −min.
    /// </summary>
    internal static float MakeQkx2Quants(int n, int nmax, ReadOnlySpan<float> x, ReadOnlySpan<float> weights, Span<byte> L, out float theMin,
        Span<byte> laux, float rmin, float rdelta, int nstep)
    {
        float min = x[0], max = x[0];
        float sumW = weights[0];
        float sumX = sumW * x[0];
        for (int i = 1; i < n; i++)
        {
            if (x[i] < min) min = x[i];
            if (x[i] > max) max = x[i];
            float w = weights[i];
            sumW += w;
            sumX += w * x[i];
        }
        if (min > 0) min = 0;
        if (max == min)
        {
            for (int i = 0; i < n; i++) L[i] = 0;
            theMin = -min;
            return 0f;
        }
        float iscale = nmax / (max - min);
        float scale = 1 / iscale;
        float bestError = 0;
        for (int i = 0; i < n; i++)
        {
            int l = NearestInt(iscale * (x[i] - min));
            L[i] = (byte)Math.Max(0, Math.Min(nmax, l));
            float diff = scale * L[i] + min - x[i];
            bestError += weights[i] * (diff * diff);
        }
        for (int step = 0; step <= nstep; step++)
        {
            iscale = (rmin + rdelta * step + nmax) / (max - min);
            float sumL = 0, sumL2 = 0, sumXl = 0;
            for (int i = 0; i < n; i++)
            {
                int l = NearestInt(iscale * (x[i] - min));
                l = Math.Max(0, Math.Min(nmax, l));
                laux[i] = (byte)l;
                float w = weights[i];
                sumL += w * l;
                sumL2 += w * l * l;
                sumXl += w * l * x[i];
            }
            float D = sumW * sumL2 - sumL * sumL;
            if (D > 0)
            {
                float thisScale = (sumW * sumXl - sumX * sumL) / D;
                float thisMin = (sumL2 * sumX - sumL * sumXl) / D;
                if (thisMin > 0)
                {
                    thisMin = 0;
                    thisScale = sumXl / sumL2;
                }
                float curError = 0;
                for (int i = 0; i < n; i++)
                {
                    float diff = thisScale * laux[i] + thisMin - x[i];
                    curError += weights[i] * (diff * diff);
                }
                if (curError < bestError)
                {
                    laux[..n].CopyTo(L);
                    bestError = curError;
                    scale = thisScale;
                    min = thisMin;
                }
            }
        }
        theMin = -min;
        return scale;
    }

    /// <summary>
    /// ggml's <c>make_qx_quants</c> with rmse_type 1 and no importance weights: a symmetric fit with codes in
    /// [−nmax, nmax−1] (stored offset by nmax), weights x², trying 18 rescaled candidates around nmax/max.
    /// </summary>
    internal static float MakeQxQuants(int n, int nmax, ReadOnlySpan<float> x, Span<sbyte> L)
    {
        float max = 0, amax = 0;
        for (int i = 0; i < n; i++)
        {
            float ax = MathF.Abs(x[i]);
            if (ax > amax) { amax = ax; max = x[i]; }
        }
        if (amax < GroupMaxEps)
        {
            for (int i = 0; i < n; i++) L[i] = 0;
            return 0f;
        }
        float iscale = -nmax / max;
        float sumlx = 0, suml2 = 0;
        for (int i = 0; i < n; i++)
        {
            int l = NearestInt(iscale * x[i]);
            l = Math.Max(-nmax, Math.Min(nmax - 1, l));
            L[i] = (sbyte)(l + nmax);
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
        float best = scale * sumlx;
        for (int step = -9; step <= 9; step++)
        {
            if (step == 0) continue;
            iscale = -(nmax + 0.1f * step) / max;
            sumlx = suml2 = 0;
            for (int i = 0; i < n; i++)
            {
                int l = NearestInt(iscale * x[i]);
                l = Math.Max(-nmax, Math.Min(nmax - 1, l));
                float w = x[i] * x[i];
                sumlx += w * x[i] * l;
                suml2 += w * l * l;
            }
            if (suml2 > 0 && sumlx * sumlx > best * suml2)
            {
                for (int i = 0; i < n; i++)
                {
                    int l = NearestInt(iscale * x[i]);
                    L[i] = (sbyte)(nmax + Math.Max(-nmax, Math.Min(nmax - 1, l)));
                }
                scale = sumlx / suml2;
                best = scale * sumlx;
            }
        }
        return scale;
    }

    /// <summary>ggml's <c>nearest_int</c>: round to nearest, ties to even, by adding 1.5·2²³ (valid for |x| ≤ 4194303).</summary>
    internal static int NearestInt(float value)
    {
        float v = value + 12582912f;
        int i = BitConverter.SingleToInt32Bits(v);
        return (i & 0x007fffff) - 0x00400000;
    }

    /// <summary>Unpacks the 6-bit scale and min of sub-block <paramref name="j"/> of a q4_K block's 12 scale bytes.</summary>
    internal static void ScaleMinK4(int j, ReadOnlySpan<byte> q, out byte d, out byte m)
    {
        if (j < 4)
        {
            d = (byte)(q[j] & 63);
            m = (byte)(q[j + 4] & 63);
        }
        else
        {
            d = (byte)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
            m = (byte)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
        }
    }

    // The first value of largest magnitude, with its sign (q4_0/q5_0 scale by it so that value gets the extreme code).
    private static float LargestMagnitude(ReadOnlySpan<float> x)
    {
        float amax = 0, max = 0;
        foreach (float v in x)
            if (amax < MathF.Abs(v)) { amax = MathF.Abs(v); max = v; }
        return max;
    }

    // C's (int8_t) cast of a float: truncation toward zero of a value the callers keep inside [-1, 17].
    private static int TruncToInt8(float v) => unchecked((sbyte)(int)v);

    private static void WriteHalf(Span<byte> y, int offset, float v) => BinaryPrimitives.WriteHalfLittleEndian(y[offset..], (Half)v);

    private static float ReadHalf(ReadOnlySpan<byte> y, int offset) => (float)BinaryPrimitives.ReadHalfLittleEndian(y[offset..]);
}
