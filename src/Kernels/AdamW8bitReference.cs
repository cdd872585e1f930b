using QLora.Quant;

namespace QLora.Kernels;

/// <summary>
/// The CPU path of the 8-bit blockwise AdamW update, plain C# over spans, with exactly the contract of
/// <see cref="AdamW8bitKernel"/> (same float32 operations in the same order, same quantization, same handling of
/// non-finite gradients per element). Blocks are independent, so large tensors are split across threads.
/// </summary>
public static class AdamW8bitReference
{
    /// <summary>
    /// Applies one update to <paramref name="param"/> (float32) given <paramref name="grad"/>, with states
    /// <paramref name="state1"/>/<paramref name="state2"/> (one code per element) and their per-block absmax
    /// (<c>ceil(n/256)</c> each), all updated in place.
    /// </summary>
    public static void Update(Span<float> param, ReadOnlySpan<float> grad, Span<byte> state1, Span<byte> state2,
        Span<float> absmax1, Span<float> absmax2, in AdamW8bitStep step)
    {
        int n = param.Length;
        int blocks = (n + AdamW8bitStep.Blocksize - 1) / AdamW8bitStep.Blocksize;
        if (grad.Length != n || state1.Length != n || state2.Length != n)
            throw new ArgumentException($"param, grad and states must have the same length ({n})");
        if (absmax1.Length != blocks || absmax2.Length != blocks)
            throw new ArgumentException($"absmax spans must have {blocks} entries (one per {AdamW8bitStep.Blocksize} elements)");
        for (int b = 0; b < blocks; b++)
            UpdateBlock(param, grad, state1, state2, absmax1, absmax2, step, b);
    }

    /// <summary>
    /// The same update for bfloat16 parameters and gradients (raw bits): both widened exactly to float32, the update
    /// computed as for float32, the parameter rounded to nearest even once (elements with a non-finite gradient keep
    /// their bits).
    /// </summary>
    public static void Update(Span<ushort> param, ReadOnlySpan<ushort> grad, Span<byte> state1, Span<byte> state2,
        Span<float> absmax1, Span<float> absmax2, in AdamW8bitStep step)
    {
        int n = param.Length;
        if (grad.Length != n) throw new ArgumentException($"param and grad must have the same length ({n})");
        Span<float> p = stackalloc float[AdamW8bitStep.Blocksize];
        Span<float> g = stackalloc float[AdamW8bitStep.Blocksize];
        int blocks = (n + AdamW8bitStep.Blocksize - 1) / AdamW8bitStep.Blocksize;
        if (state1.Length != n || state2.Length != n || absmax1.Length != blocks || absmax2.Length != blocks)
            throw new ArgumentException($"states must have {n} entries and absmax {blocks} (one per {AdamW8bitStep.Blocksize} elements)");
        for (int b = 0; b < blocks; b++)
        {
            int start = b * AdamW8bitStep.Blocksize, len = Math.Min(AdamW8bitStep.Blocksize, n - start);
            for (int i = 0; i < len; i++)
            {
                p[i] = BFloat16.ToFloat(param[start + i]);
                g[i] = BFloat16.ToFloat(grad[start + i]);
            }
            // Block b of the float32 update is block 0 of these temporaries (absmax/state slices start at the block).
            UpdateBlock(p[..len], g[..len], state1.Slice(start, len), state2.Slice(start, len),
                absmax1.Slice(b, 1), absmax2.Slice(b, 1), step, 0);
            for (int i = 0; i < len; i++)
                if (float.IsFinite(g[i])) param[start + i] = BFloat16.FromFloat(p[i]);
        }
    }

    /// <summary>Updates block <paramref name="block"/> (elements [256·block, min(256·block + 256, n))) in place.</summary>
    public static void UpdateBlock(Span<float> param, ReadOnlySpan<float> grad, Span<byte> state1, Span<byte> state2,
        Span<float> absmax1, Span<float> absmax2, in AdamW8bitStep step, int block)
    {
        var signed = DynamicMap.Signed;
        var unsigned = DynamicMap.Unsigned;
        int start = block * AdamW8bitStep.Blocksize;
        int len = Math.Min(AdamW8bitStep.Blocksize, param.Length - start);
        Span<float> s1 = stackalloc float[len];
        Span<float> s2 = stackalloc float[len];
        float a1 = absmax1[block], a2 = absmax2[block];
        float max1 = 0f, max2 = 0f;
        for (int i = 0; i < len; i++)
        {
            int e = start + i;
            float g = grad[e];
            if (!float.IsFinite(g))
            {
                s1[i] = 0f;
                s2[i] = 0f;
                continue;
            }
            float m = signed[state1[e]] * a1;
            m = m * step.Beta1 + step.OneMinusBeta1 * g;
            float v = unsigned[state2[e]] * a2;
            v = v * step.Beta2 + step.OneMinusBeta2 * (g * g);
            s1[i] = m;
            s2[i] = v;
            if (MathF.Abs(m) > max1) max1 = MathF.Abs(m);
            if (v > max2) max2 = v;
        }

        float inv1 = max1 > 0f ? 1f / max1 : 0f;
        float inv2 = max2 > 0f ? 1f / max2 : 0f;
        for (int i = 0; i < len; i++)
        {
            int e = start + i;
            if (float.IsFinite(grad[e]))
            {
                float p = param[e];
                p = p + step.StepSize * (s1[i] / (MathF.Sqrt(s2[i]) + step.EpsilonTerm));
                param[e] = p * step.DecayFactor;
            }
            int c1 = DynamicMap.Nearest(signed, s1[i] * inv1);
            if (float.IsNegative(signed[c1]) != float.IsNegative(s1[i])) c1 += s1[i] > 0f ? 1 : -1;
            state1[e] = (byte)c1;
            state2[e] = DynamicMap.Nearest(unsigned, s2[i] * inv2);
        }
        absmax1[block] = max1;
        absmax2[block] = max2;
    }
}
