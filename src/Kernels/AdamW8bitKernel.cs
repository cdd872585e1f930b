using ILGPU;

namespace QLora.Kernels;

/// <summary>
/// The 8-bit blockwise AdamW update as ILGPU kernels (bitsandbytes semantics, spec §6): one thread per state block of
/// <see cref="AdamW8bitStep.Blocksize"/> elements. Pass 1 decodes both states, applies the moment updates and finds
/// the new per-block absmax; pass 2 recomputes the same values (deterministically), updates the parameter and
/// requantizes: first moment with the signed map (its code nudged one step when the code's sign differs from the
/// value's), second moment with the unsigned map, nearest entry with ties to the even index.
/// Non-finite gradient, per element: both states of that element become 0 and its parameter is left untouched
/// (no update, no decay), as bitsandbytes' blockwise kernel does.
/// Must equal <see cref="AdamW8bitReference"/> bit for bit.
/// </summary>
/// <remarks>
/// One thread per block keeps the block reduction free of shared memory and barriers; its loads are strided, which
/// is acceptable for LoRA-sized states. Launch extent: <c>ceil(count / 256)</c>. Two parameter types: float32
/// (<see cref="AdamW8bitUpdate"/>) and bfloat16 (<see cref="AdamW8bitUpdateBf16"/>: parameter and gradient widened
/// exactly, the update computed in float32, the parameter rounded to nearest even once).
/// </remarks>
public static class AdamW8bitKernel
{
    /// <summary>Updates float32 <paramref name="param"/> and both 8-bit states of block <paramref name="block"/> in place.</summary>
    public static void AdamW8bitUpdate(Index1D block, ArrayView<float> param, ArrayView<float> grad,
        ArrayView<byte> state1, ArrayView<byte> state2, ArrayView<float> absmax1, ArrayView<float> absmax2,
        ArrayView<float> signedMap, ArrayView<float> unsignedMap, long count,
        float beta1, float beta2, float oneMinusBeta1, float oneMinusBeta2, float stepSize, float epsilonTerm, float decayFactor)
    {
        long start = (long)block.X * AdamW8bitStep.Blocksize;
        long end = start + AdamW8bitStep.Blocksize < count ? start + AdamW8bitStep.Blocksize : count;
        float a1 = absmax1[block.X], a2 = absmax2[block.X];

        float max1 = 0f, max2 = 0f;
        for (long e = start; e < end; e++)
        {
            Moments(grad[e], signedMap[(int)state1[e]] * a1, unsignedMap[(int)state2[e]] * a2, beta1, beta2, oneMinusBeta1, oneMinusBeta2,
                out float s1, out float s2);
            Track(s1, s2, ref max1, ref max2);
        }

        float inv1 = max1 > 0f ? 1f / max1 : 0f;
        float inv2 = max2 > 0f ? 1f / max2 : 0f;
        for (long e = start; e < end; e++)
        {
            bool finite = Moments(grad[e], signedMap[(int)state1[e]] * a1, unsignedMap[(int)state2[e]] * a2, beta1, beta2,
                oneMinusBeta1, oneMinusBeta2, out float s1, out float s2);
            if (finite) param[e] = Step(param[e], s1, s2, stepSize, epsilonTerm, decayFactor);
            Requantize(e, s1, s2, inv1, inv2, state1, state2, signedMap, unsignedMap);
        }
        absmax1[block.X] = max1;
        absmax2[block.X] = max2;
    }

    /// <summary>Updates bfloat16 <paramref name="param"/> (bits) with bfloat16 <paramref name="grad"/>, and both 8-bit states of block <paramref name="block"/>, in place.</summary>
    public static void AdamW8bitUpdateBf16(Index1D block, ArrayView<ushort> param, ArrayView<ushort> grad,
        ArrayView<byte> state1, ArrayView<byte> state2, ArrayView<float> absmax1, ArrayView<float> absmax2,
        ArrayView<float> signedMap, ArrayView<float> unsignedMap, long count,
        float beta1, float beta2, float oneMinusBeta1, float oneMinusBeta2, float stepSize, float epsilonTerm, float decayFactor)
    {
        long start = (long)block.X * AdamW8bitStep.Blocksize;
        long end = start + AdamW8bitStep.Blocksize < count ? start + AdamW8bitStep.Blocksize : count;
        float a1 = absmax1[block.X], a2 = absmax2[block.X];

        float max1 = 0f, max2 = 0f;
        for (long e = start; e < end; e++)
        {
            Moments(Widen(grad[e]), signedMap[(int)state1[e]] * a1, unsignedMap[(int)state2[e]] * a2, beta1, beta2, oneMinusBeta1,
                oneMinusBeta2, out float s1, out float s2);
            Track(s1, s2, ref max1, ref max2);
        }

        float inv1 = max1 > 0f ? 1f / max1 : 0f;
        float inv2 = max2 > 0f ? 1f / max2 : 0f;
        for (long e = start; e < end; e++)
        {
            bool finite = Moments(Widen(grad[e]), signedMap[(int)state1[e]] * a1, unsignedMap[(int)state2[e]] * a2, beta1, beta2,
                oneMinusBeta1, oneMinusBeta2, out float s1, out float s2);
            if (finite) param[e] = (ushort)HalfBits.BFloat16Bits(Step(Widen(param[e]), s1, s2, stepSize, epsilonTerm, decayFactor));
            Requantize(e, s1, s2, inv1, inv2, state1, state2, signedMap, unsignedMap);
        }
        absmax1[block.X] = max1;
        absmax2[block.X] = max2;
    }

    /// <summary>bfloat16 bits → float32, exactly (the shift discards whatever widening ILGPU chose for the ushort).</summary>
    private static float Widen(ushort bits) => Interop.IntAsFloat((uint)bits << 16);

    /// <summary>The moment updates; false (and zero states) for a non-finite gradient.</summary>
    private static bool Moments(float g, float s1Old, float s2Old, float beta1, float beta2, float oneMinusBeta1,
        float oneMinusBeta2, out float s1, out float s2)
    {
        if ((Interop.FloatAsInt(g) & 0x7F800000u) == 0x7F800000u)
        {
            s1 = 0f;
            s2 = 0f;
            return false;
        }
        s1 = s1Old * beta1 + oneMinusBeta1 * g;
        s2 = s2Old * beta2 + oneMinusBeta2 * (g * g);
        return true;
    }

    private static void Track(float s1, float s2, ref float max1, ref float max2)
    {
        float m1 = s1 < 0f ? -s1 : s1;
        if (m1 > max1) max1 = m1;
        if (s2 > max2) max2 = s2;
    }

    /// <summary>The Adam step then the decoupled decay: <c>(p + step·s1/(sqrt(s2) + epsTerm)) · decay</c>.</summary>
    private static float Step(float p, float s1, float s2, float stepSize, float epsilonTerm, float decayFactor)
    {
        p = p + stepSize * (s1 / (MathF.Sqrt(s2) + epsilonTerm));
        return p * decayFactor;
    }

    private static void Requantize(long e, float s1, float s2, float inv1, float inv2, ArrayView<byte> state1,
        ArrayView<byte> state2, ArrayView<float> signedMap, ArrayView<float> unsignedMap)
    {
        int c1 = Nearest(signedMap, s1 * inv1);
        if ((Interop.FloatAsInt(signedMap[c1]) >> 31) != (Interop.FloatAsInt(s1) >> 31)) c1 += s1 > 0f ? 1 : -1;
        state1[e] = (byte)c1;
        state2[e] = (byte)Nearest(unsignedMap, s2 * inv2);
    }

    /// <summary>Index of the nearest entry of an ascending 256-entry map; exact ties go to the even index, NaN to 0.</summary>
    private static int Nearest(ArrayView<float> map, float x)
    {
        if ((Interop.FloatAsInt(x) & 0x7FFFFFFFu) > 0x7F800000u || x <= map[0]) return 0; // NaN gives 0
        if (x >= map[255]) return 255;
        int lo = 0, hi = 255;
        while (hi - lo > 1)
        {
            int mid = (lo + hi) >> 1;
            if (map[mid] < x) lo = mid;
            else hi = mid;
        }
        double below = (double)x - map[lo], above = (double)map[hi] - x; // exact in double
        if (below < above) return lo;
        if (above < below) return hi;
        return (lo & 1) == 0 ? lo : hi;
    }
}
