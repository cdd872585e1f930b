namespace QLora.Quant.Tests;

public class FourBitQuantizerTests
{
    private static readonly int[] Blocksizes = [32, 64, 128, 256, 512, 1024, 2048, 4096];

    [Fact]
    public void PacksTheEvenElementInTheHighNibbleAndPadsAnOddTailWithTheZeroCode()
    {
        // Hand-checked: absmax 1; 1 -> 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (below threshold 0.5017), -0.25 -> 4; pad -> 7.
        var q = FourBitQuantizer.Quantize([1f, -1f, 0f, 0.5f, -0.25f], [5], QuantType.Nf4, 32, doubleQuant: false);
        Assert.Equal(new byte[] { 0xF0, 0x7C, 0x47 }, q.Packed);
        Assert.Equal(new[] { 1f }, q.State.Absmax);
        Assert.Equal(3, q.State.PackedBytes);
    }

    [Fact]
    public void ScalesByOneReciprocalPerBlockThenMultiplies()
    {
        // absmax 3: inv = 1/3f; 1 * inv = 0.33333334 -> code 11 (0.3379), 2*inv -> 0.6666667 -> code 14 (> 0.6428)
        var q = FourBitQuantizer.Quantize([3f, 1f, 2f, -3f], [4], QuantType.Nf4, 32, doubleQuant: false);
        Assert.Equal(new byte[] { 0xFB, 0xE0 }, q.Packed);
        Assert.Equal(3f, q.State.Absmax![0]);
    }

    [Fact]
    public void APartialLastBlockHasItsOwnAbsmax()
    {
        var x = new float[40];
        for (int i = 0; i < 32; i++) x[i] = 8f;
        for (int i = 32; i < 40; i++) x[i] = i == 35 ? -0.5f : 0.25f;
        var q = FourBitQuantizer.Quantize(x, [40], QuantType.Nf4, 32, doubleQuant: false);
        Assert.Equal(new[] { 8f, 0.5f }, q.State.Absmax);
        Assert.Equal(0xCC, q.Packed[16]); // 0.25 / 0.5 = 0.5 -> code 12, twice
        Assert.Equal(0xC0, q.Packed[17]); // 0.5 -> 12, then -0.5 / 0.5 = -1 -> code 0
    }

    [Fact]
    public void AnAllZeroBlockGetsTheZeroCodeAndDecodesToExactZeros()
    {
        var x = new float[96];
        for (int i = 64; i < 96; i++) x[i] = i - 80;
        foreach (var type in new[] { QuantType.Nf4, QuantType.Fp4 })
        {
            var q = FourBitQuantizer.Quantize(x, [96], type, 32, doubleQuant: true);
            byte z = type.ZeroCode();
            for (int i = 0; i < 32; i++) Assert.Equal((byte)(z << 4 | z), q.Packed[i]);
            var back = new float[96];
            FourBitReferenceDequantizer.Dequantize(q, FloatType.Float32, System.Runtime.InteropServices.MemoryMarshal.AsBytes(back.AsSpan()));
            for (int i = 0; i < 64; i++) Assert.Equal(0f, back[i]);
        }
    }

    [Fact]
    public void NaNGetsCodeZeroAndDoesNotPoisonTheAbsmax()
    {
        var x = new float[32];
        x[0] = float.NaN; x[1] = 2f; x[2] = -1f;
        var q = FourBitQuantizer.Quantize(x, [32], QuantType.Nf4, 32, doubleQuant: false);
        Assert.Equal(2f, q.State.Absmax![0]);
        Assert.Equal(0x0F, q.Packed[0]); // NaN -> 0 (high), 2 -> 15 (low)
    }

    [Theory]
    [InlineData(QuantType.Nf4, 32)]
    [InlineData(QuantType.Nf4, 64)]
    [InlineData(QuantType.Nf4, 4096)]
    [InlineData(QuantType.Fp4, 64)]
    public void CodesAreTheNearestTableValuesOfANaiveReference(QuantType type, int blocksize)
    {
        // Independent reference: per block absmax, one float32 reciprocal, then the nearest table value in double
        // (ties to the lower value; FP4 by its sign bit and magnitude). Random data never lands in the float32 slack
        // between a threshold literal and the exact midpoint.
        int n = 3 * blocksize + 7;
        var x = TestData.Randn(n, seed: blocksize + (int)type);
        x[5] = float.NaN;
        var q = FourBitQuantizer.Quantize(x, [n], type, blocksize, doubleQuant: false);
        var table = type.Table().ToArray();
        for (int b = 0; b * blocksize < n; b++)
        {
            int start = b * blocksize, len = Math.Min(blocksize, n - start);
            float m = 0;
            for (int i = 0; i < len; i++) if (Math.Abs(x[start + i]) > m) m = Math.Abs(x[start + i]);
            Assert.Equal(m, q.State.Absmax![b]);
            float inv = 1f / m;
            for (int i = 0; i < len; i++)
            {
                int e = start + i;
                float scaled = x[e] * inv;
                int expected = 0;
                if (!float.IsNaN(scaled))
                {
                    var candidates = Enumerable.Range(0, 16).Where(c => type == QuantType.Nf4 || (c >= 8) == (scaled < 0));
                    expected = candidates.OrderBy(c => Math.Abs((double)table[c] - scaled)).ThenBy(c => table[c] == 0 ? 0 : Math.Abs(table[c])).First();
                }
                int actual = (e & 1) == 0 ? q.Packed[e >> 1] >> 4 : q.Packed[e >> 1] & 0xF;
                Assert.True(expected == actual, $"element {e}: scaled {scaled} -> {actual}, nearest is {expected}");
            }
        }
    }

    [Fact]
    public void RejectsBlocksizesBitsandbytesDoesNotAccept()
    {
        foreach (var bs in new[] { 0, 16, 48, 8192, -64 })
            Assert.Throws<ArgumentOutOfRangeException>(() => FourBitQuantizer.Quantize([1f, 2f], [2], QuantType.Nf4, bs));
    }

    public static TheoryData<int, double, double, double> Nf4Bars => new()
    {
        { 32, 0.067746, 0.068229, 0.191854 }, { 64, 0.072798, 0.073316, 0.205719 },
        { 128, 0.076831, 0.077468, 0.217974 }, { 256, 0.080337, 0.081051, 0.228891 },
        { 512, 0.083547, 0.084548, 0.239887 }, { 1024, 0.086610, 0.087919, 0.249570 },
        { 2048, 0.089592, 0.091349, 0.259392 }, { 4096, 0.092547, 0.095067, 0.269466 },
    };

    [Theory]
    [MemberData(nameof(Nf4Bars))]
    public void Nf4RoundTripErrorOnRandnIsWithinBitsandbytesBars(int blocksize, double expectedAbs, double absBar, double relBar)
    {
        var x = TestData.Randn(1024 * 1024, seed: blocksize);
        var (abs, rel) = RoundTripError(x, QuantType.Nf4, blocksize, doubleQuant: false, FloatType.Float32);
        Assert.True(abs < absBar, $"abs {abs} >= {absBar}");
        Assert.True(rel < relBar, $"rel {rel} >= {relBar}");
        Assert.InRange(abs, expectedAbs * 0.99, expectedAbs * 1.01); // the same algorithm lands on bitsandbytes' mean
    }

    [Fact]
    public void Fp4RoundTripErrorIsWithinBitsandbytesBars()
    {
        var x = TestData.Randn(1024 * 1024, seed: 7);
        var (abs, rel) = RoundTripError(x, QuantType.Fp4, 64, doubleQuant: false, FloatType.Float32);
        Assert.True(abs < 0.097320, $"abs {abs}");
        Assert.True(rel < 0.262778, $"rel {rel}");
    }

    [Theory]
    [InlineData(32, FloatType.Float32)]
    [InlineData(64, FloatType.Float32)]
    [InlineData(128, FloatType.Float32)]
    [InlineData(64, FloatType.Float16)]
    [InlineData(64, FloatType.BFloat16)]
    public void DoubleQuantizedRoundTripErrorIsWithinBars(int blocksize, FloatType dtype)
    {
        var x = TestData.Randn(1024 * 1024, seed: 11);
        foreach (var type in new[] { QuantType.Nf4, QuantType.Fp4 })
        {
            var (abs, rel) = RoundTripError(x, type, blocksize, doubleQuant: true, dtype);
            Assert.True(abs < 0.11, $"{type} abs {abs}");
            Assert.True(rel < 0.28, $"{type} rel {rel}");
        }
    }

    [Theory]
    [InlineData(FloatType.Float32)]
    [InlineData(FloatType.BFloat16)]
    [InlineData(FloatType.Float16)]
    public void DequantizesIntoTheRequestedTypeAndRecordsTheInputType(FloatType dtype)
    {
        var x = TestData.Randn(1000, seed: 3);
        var input = new byte[x.Length * dtype.Size()];
        FloatTypes.FromFloat32(x, dtype, input);
        var q = FourBitQuantizer.Quantize(input, dtype, [10, 100]);
        Assert.Equal(dtype, q.State.DType);
        Assert.Equal(new long[] { 10, 100 }, q.State.Shape);
        foreach (var outType in new[] { FloatType.Float32, FloatType.BFloat16, FloatType.Float16 })
        {
            var o = new byte[x.Length * outType.Size()];
            FourBitReferenceDequantizer.Dequantize(q, outType, o);
            var f = new float[x.Length];
            FloatTypes.ToFloat32(o, outType, f);
            double err = 0;
            for (int i = 0; i < x.Length; i++) err += Math.Abs(f[i] - x[i]);
            Assert.True(err / x.Length < 0.11);
        }
    }

    private static (double Abs, double Rel) RoundTripError(float[] x, QuantType type, int blocksize, bool doubleQuant, FloatType dtype)
    {
        var input = new byte[x.Length * dtype.Size()];
        FloatTypes.FromFloat32(x, dtype, input);
        var original = new float[x.Length];
        FloatTypes.ToFloat32(input, dtype, original);
        var q = FourBitQuantizer.Quantize(input, dtype, [1024, x.Length / 1024], type, blocksize, doubleQuant);
        var o = new byte[x.Length * dtype.Size()];
        FourBitDequantizer.Dequantize(q, dtype, o);
        var back = new float[x.Length];
        FloatTypes.ToFloat32(o, dtype, back);
        double abs = 0, rel = 0;
        for (int i = 0; i < x.Length; i++)
        {
            double d = Math.Abs((double)original[i] - back[i]);
            abs += d;
            rel += d / (Math.Abs(original[i]) + 1e-8);
        }
        return (abs / x.Length, rel / x.Length);
    }
}
