using QLora.Quant;

namespace QLora.Kernels.Tests;

[Collection(CpuAcceleratorCollection.Name)]
public class AdamW8bitTests(CpuAcceleratorFixture fixture)
{
    private sealed record State(float[] Param, byte[] S1, byte[] S2, float[] A1, float[] A2)
    {
        public static State Fresh(int n, int seed)
        {
            var rng = new Random(seed);
            int blocks = (n + 255) / 256;
            var s1 = new byte[n];
            Array.Fill(s1, (byte)127); // the signed map's 0.0
            return new State(Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray(),
                s1, new byte[n], new float[blocks], new float[blocks]);
        }

        public State Copy() => new((float[])Param.Clone(), (byte[])S1.Clone(), (byte[])S2.Clone(), (float[])A1.Clone(), (float[])A2.Clone());
    }

    private static float[] Gradient(int n, int seed, bool specials)
    {
        var rng = new Random(seed);
        var g = Enumerable.Range(0, n).Select(_ => (float)((rng.NextDouble() - 0.5) * 0.1)).ToArray();
        if (specials)
        {
            if (n > 5) g[5] = float.NaN;
            if (n > 300) g[300] = float.PositiveInfinity;
            if (n > 301) g[301] = float.NegativeInfinity;
            if (n > 700) Array.Clear(g, 512, Math.Min(256, n - 512)); // an all-zero gradient block
        }
        return g;
    }

    [Theory]
    [InlineData(1, false)]
    [InlineData(255, false)]
    [InlineData(256, false)]
    [InlineData(257, true)]
    [InlineData(1000, true)]
    [InlineData(4097, true)]
    public void KernelEqualsReferenceOverSeveralSteps(int n, bool specials)
    {
        var reference = State.Fresh(n, n);
        var kernel = reference.Copy();
        for (int t = 1; t <= 4; t++)
        {
            var step = AdamW8bitStep.Create(lr: 1e-3f, beta1: 0.9f, beta2: 0.999f, eps: 1e-8f, weightDecay: 0.01f, step: t);
            var g = Gradient(n, 100 * t + n, specials && t == 2);
            AdamW8bitReference.Update(reference.Param, g, reference.S1, reference.S2, reference.A1, reference.A2, step);
            fixture.Runner.AdamW8bitUpdate(kernel.Param, g, kernel.S1, kernel.S2, kernel.A1, kernel.A2, step);
            AssertEqualBits(reference.Param, kernel.Param, $"param, step {t}");
            Assert.Equal(reference.S1, kernel.S1);
            Assert.Equal(reference.S2, kernel.S2);
            AssertEqualBits(reference.A1, kernel.A1, $"absmax1, step {t}");
            AssertEqualBits(reference.A2, kernel.A2, $"absmax2, step {t}");
        }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(300)]
    [InlineData(1000)]
    public void Bf16KernelEqualsReferenceOverSeveralSteps(int n)
    {
        var fresh = State.Fresh(n, n + 1);
        var pRef = fresh.Param.Select(BFloat16.FromFloat).ToArray();
        var pKernel = (ushort[])pRef.Clone();
        var kernel = fresh.Copy();
        for (int t = 1; t <= 4; t++)
        {
            var step = AdamW8bitStep.Create(1e-2f, 0.9f, 0.999f, 1e-8f, 0.01f, t);
            var g = Gradient(n, 7 * t + n, specials: t == 3).Select(BFloat16.FromFloat).ToArray();
            AdamW8bitReference.Update(pRef, g, fresh.S1, fresh.S2, fresh.A1, fresh.A2, step);
            fixture.Runner.AdamW8bitUpdate(pKernel, g, kernel.S1, kernel.S2, kernel.A1, kernel.A2, step);
            Assert.Equal(pRef, pKernel);
            Assert.Equal(fresh.S1, kernel.S1);
            Assert.Equal(fresh.S2, kernel.S2);
            AssertEqualBits(fresh.A1, kernel.A1, $"absmax1, step {t}");
            AssertEqualBits(fresh.A2, kernel.A2, $"absmax2, step {t}");
        }
        Assert.NotEqual(fresh.Param.Select(BFloat16.FromFloat).ToArray(), pRef); // it moved
    }

    [Fact]
    public void Bf16ReferenceMatchesFloat32ReferenceBeforeRounding()
    {
        // Same states and widened values: the bf16 path is the float32 path plus one rounding of the parameter.
        int n = 700;
        var s32 = State.Fresh(n, 9);
        var p16 = s32.Param.Select(BFloat16.FromFloat).ToArray();
        for (int i = 0; i < n; i++) s32.Param[i] = BFloat16.ToFloat(p16[i]);
        var s16 = s32.Copy();
        var g16 = Gradient(n, 10, specials: true).Select(BFloat16.FromFloat).ToArray();
        var g32 = g16.Select(BFloat16.ToFloat).ToArray();
        var step = AdamW8bitStep.Create(1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 1);
        AdamW8bitReference.Update(s32.Param, g32, s32.S1, s32.S2, s32.A1, s32.A2, step);
        AdamW8bitReference.Update(p16, g16, s16.S1, s16.S2, s16.A1, s16.A2, step);
        Assert.Equal(s32.S1, s16.S1);
        Assert.Equal(s32.S2, s16.S2);
        Assert.Equal(s32.Param.Select(BFloat16.FromFloat).ToArray(), p16);
    }

    [Fact]
    public void NonFiniteGradientZeroesThatElementsStatesAndLeavesItsParameter()
    {
        var s = State.Fresh(512, 3);
        var g = Gradient(512, 4, specials: false);
        var step = AdamW8bitStep.Create(1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, 1);
        AdamW8bitReference.Update(s.Param, g, s.S1, s.S2, s.A1, s.A2, step);
        var before = (float[])s.Param.Clone();
        g[10] = float.NaN;
        AdamW8bitReference.Update(s.Param, g, s.S1, s.S2, s.A1, s.A2, AdamW8bitStep.Create(1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, 2));
        Assert.Equal(before[10], s.Param[10]);
        Assert.Equal(0f, DynamicMap.Signed[s.S1[10]]);
        Assert.Equal(0f, DynamicMap.Unsigned[s.S2[10]]);
        Assert.NotEqual(before[11], s.Param[11]);
    }

    [Fact]
    public void TracksFloat32AdamW()
    {
        // bitsandbytes' bar: parameter mean abs error against float32 AdamW stays small.
        const int n = 4096;
        var s = State.Fresh(n, 7);
        var p32 = (float[])s.Param.Clone();
        var m = new float[n];
        var v = new float[n];
        const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f;
        for (int t = 1; t <= 20; t++)
        {
            var g = Gradient(n, t, specials: false);
            AdamW8bitReference.Update(s.Param, g, s.S1, s.S2, s.A1, s.A2, AdamW8bitStep.Create(lr, b1, b2, eps, wd, t));
            for (int i = 0; i < n; i++)
            {
                m[i] = b1 * m[i] + (1 - b1) * g[i];
                v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
                float mh = m[i] / (1 - MathF.Pow(b1, t)), vh = v[i] / (1 - MathF.Pow(b2, t));
                p32[i] = (p32[i] - lr * mh / (MathF.Sqrt(vh) + eps)) * (1 - lr * wd);
            }
        }
        double err = 0;
        for (int i = 0; i < n; i++) err += Math.Abs(p32[i] - s.Param[i]);
        Assert.True(err / n < 1e-4, $"mean abs error {err / n}");
    }

    [Fact]
    public void ReferenceRejectsMismatchedSpans()
    {
        var step = AdamW8bitStep.Create(1e-3f, 0.9f, 0.999f, 1e-8f, 0f, 1);
        Assert.Throws<ArgumentException>(() =>
            AdamW8bitReference.Update(new float[300], new float[300], new byte[300], new byte[300], new float[1], new float[2], step));
    }

    private static void AssertEqualBits(float[] expected, float[] actual, string what)
    {
        for (int i = 0; i < expected.Length; i++)
            if (BitConverter.SingleToUInt32Bits(expected[i]) != BitConverter.SingleToUInt32Bits(actual[i]))
                Assert.Fail($"{what}: element {i} expected {expected[i]:R} got {actual[i]:R}");
    }
}
