using System.Buffers.Binary;
using QLora.Quant.Gguf;

namespace QLora.Quant.Tests.Gguf;

/// Checks the block quantizers against float64 re-statements of ggml's published algorithms and hand-worked blocks.
public sealed class GgmlQuantizerTests
{
    [Theory]
    [InlineData(0.5f, 0)]
    [InlineData(1.5f, 2)]
    [InlineData(2.5f, 2)]
    [InlineData(-0.5f, 0)]
    [InlineData(-1.5f, -2)]
    [InlineData(3.49f, 3)]
    [InlineData(-7.6f, -8)]
    public void Nearest_int_rounds_ties_to_even(float x, int expected) => Assert.Equal(expected, GgmlQuantizer.NearestInt(x));

    [Fact]
    public void Q8_0_matches_a_float64_reference_away_from_ties()
    {
        var rng = new Random(1);
        var x = RandomRows(rng, 64, 32);
        var y = new byte[2 * 34];
        GgmlQuantizer.Quantize(GgmlType.Q8_0, x, 32, y);
        for (int b = 0; b < 2; b++)
        {
            var xs = x.AsSpan(32 * b, 32);
            double amax = 0;
            foreach (var v in xs) amax = Math.Max(amax, Math.Abs(v));
            Assert.Equal((Half)(amax / 127), BinaryPrimitives.ReadHalfLittleEndian(y.AsSpan(34 * b)));
            for (int j = 0; j < 32; j++)
            {
                double t = xs[j] * 127 / amax;
                if (NearTie(t)) continue;
                Assert.Equal((int)Math.Round(t, MidpointRounding.AwayFromZero), (sbyte)y[34 * b + 2 + j]);
            }
        }
    }

    [Fact]
    public void Q8_0_hand_block_rounds_halves_away_from_zero()
    {
        // amax 127 makes d = 1 exactly: codes are roundf(x).
        var x = new float[32];
        x[0] = 127; x[1] = 2.5f; x[2] = -2.5f; x[3] = 0.49f; x[4] = -126.5f;
        var y = new byte[34];
        GgmlQuantizer.Quantize(GgmlType.Q8_0, x, 32, y);
        Assert.Equal((Half)1, BinaryPrimitives.ReadHalfLittleEndian(y));
        Assert.Equal(new sbyte[] { 127, 3, -3, 0, -127 }, y[2..7].Select(b => (sbyte)b));
    }

    [Fact]
    public void Q4_0_and_q5_0_match_a_float64_reference_away_from_ties()
    {
        var rng = new Random(2);
        var x = RandomRows(rng, 96, 32);
        foreach (var (type, levels, bytes) in new[] { (GgmlType.Q4_0, 8, 18), (GgmlType.Q5_0, 16, 22) })
        {
            var y = new byte[3 * bytes];
            GgmlQuantizer.Quantize(type, x, 32, y);
            for (int b = 0; b < 3; b++)
            {
                var xs = x.AsSpan(32 * b, 32);
                double max = 0;
                foreach (var v in xs) if (Math.Abs(v) > Math.Abs(max)) max = v;
                double d = max / -levels;
                var blk = y.AsSpan(bytes * b, bytes);
                Assert.Equal((Half)d, BinaryPrimitives.ReadHalfLittleEndian(blk));
                uint qh = type == GgmlType.Q5_0 ? BinaryPrimitives.ReadUInt32LittleEndian(blk[2..]) : 0;
                var qs = blk[(type == GgmlType.Q5_0 ? 6 : 2)..];
                for (int j = 0; j < 32; j++)
                {
                    double t = xs[j] / d + levels + 0.5;
                    if (NearTie(t - 0.5)) continue;
                    int expected = Math.Min(2 * levels - 1, (int)Math.Floor(t));
                    int code = j < 16 ? qs[j] & 0xF : qs[j - 16] >> 4;
                    if (type == GgmlType.Q5_0) code |= (int)((qh >> j) & 1) << 4;
                    Assert.Equal(expected, code);
                }
            }
        }
    }

    [Fact]
    public void Q4_K_hand_block_stores_the_exact_fits_scales_mins_and_codes()
    {
        // Sub-block j holds l·a_j/15 − b_j for l = 0..15 (twice): the plain min/max fit is exact, so the search keeps
        // scale a_j/15 and min b_j. Worked by hand: 6-bit scale = round(63·a_j/16), 6-bit min = round(63·b_j/0.5).
        double[] a = [1, 2, 3, 5, 7, 11, 13, 16];
        double[] bOff = [0.1, 0.2, 0, 0.3, 0.05, 0.5, 0.15, 0.4];
        var x = new float[256];
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < 32; i++) x[32 * j + i] = (float)(i % 16 * a[j] / 15 - bOff[j]);
        var y = new byte[144];
        GgmlQuantizer.Quantize(GgmlType.Q4_K, x, 256, y);
        Assert.Equal((Half)(16.0 / 15 / 63), BinaryPrimitives.ReadHalfLittleEndian(y));
        Assert.Equal((Half)(0.5 / 63), BinaryPrimitives.ReadHalfLittleEndian(y.AsSpan(2)));
        int[] ls = [4, 8, 12, 20, 28, 43, 51, 63];
        int[] lm = [13, 25, 0, 38, 6, 63, 19, 50];
        var sc = y.AsSpan(4, 12);
        for (int j = 0; j < 4; j++)
        {
            Assert.Equal(ls[j] | (ls[j + 4] >> 4) << 6, sc[j]);
            Assert.Equal(lm[j] | (lm[j + 4] >> 4) << 6, sc[j + 4]);
            Assert.Equal((ls[j + 4] & 0xF) | (lm[j + 4] & 0xF) << 4, sc[j + 8]);
        }
        // codes: sub-blocks 2k and 2k+1 share 32 bytes, low nibble first
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < 32; i++)
            {
                byte q = y[16 + 32 * (j / 2) + i];
                Assert.Equal(i % 16, j % 2 == 0 ? q & 0xF : q >> 4);
            }
    }

    [Fact]
    public void Q6_K_hand_block_stores_signed_scales_and_six_bit_codes()
    {
        // Sub-block j holds (l − 32)·s_j for l = 1..16 and −32·s_j at its first element, so the fit is exact with
        // scale s_j; the int8 scales are round(−128·s_j / max s) and d = −max s/128 (ggml keeps the sign in d).
        double[] s = [0.01, 0.02, 0.03, 0.05, 0.07, 0.11, 0.13, 0.16, 0.015, 0.025, 0.035, 0.045, 0.055, 0.065, 0.075, 0.085];
        var x = new float[256];
        var codes = new int[256];
        for (int j = 0; j < 16; j++)
            for (int i = 0; i < 16; i++)
            {
                int l = i == 0 ? 0 : i + 16 + (i % 3) * 5; // spread over 0..63 without hitting 64
                codes[16 * j + i] = l;
                x[16 * j + i] = (float)((l - 32) * s[j]);
            }
        var y = new byte[210];
        GgmlQuantizer.Quantize(GgmlType.Q6_K, x, 256, y);
        double d = (double)(Half)(-0.16 / 128);
        Assert.Equal((Half)(-0.16 / 128), BinaryPrimitives.ReadHalfLittleEndian(y.AsSpan(208)));
        for (int j = 0; j < 16; j++)
        {
            int expected = Math.Min(127, (int)Math.Round(-128 * s[j] / 0.16, MidpointRounding.ToEven));
            Assert.Equal(expected, (sbyte)y[192 + j]);
        }
        var back = new float[256];
        GgmlDequantizer.Dequantize(GgmlType.Q6_K, y, back);
        for (int i = 0; i < 256; i++)
        {
            int j = i / 16;
            double step = Math.Abs(d * (sbyte)y[192 + j]);
            Assert.True(Math.Abs(back[i] - x[i]) <= step / 2 + 1e-6, $"element {i}: {back[i]} vs {x[i]}");
        }
    }

    [Theory]
    [InlineData(GgmlType.Q8_0, 1.0 / 127)]
    [InlineData(GgmlType.Q4_0, 1.0 / 8)]
    [InlineData(GgmlType.Q5_0, 1.0 / 16)]
    [InlineData(GgmlType.Q4_K, 1.0 / 15)]
    [InlineData(GgmlType.Q5_K, 1.0 / 31)]
    [InlineData(GgmlType.Q6_K, 1.0 / 31)]
    public void Round_trip_error_stays_within_a_step_of_the_block_range(GgmlType type, double relativeStep)
    {
        var rng = new Random(3);
        var x = RandomRows(rng, 2 * 512, 512);
        var y = new byte[type.RowBytes(512) * 2];
        GgmlQuantizer.Quantize(type, x, 512, y);
        var back = new float[x.Length];
        GgmlDequantizer.Dequantize(type, y, back);
        int block = Math.Max(type.BlockSize(), 32);
        double sumSq = 0, errSq = 0;
        for (int b = 0; b < x.Length / block; b++)
        {
            double range = 0;
            for (int i = 0; i < block; i++) range = Math.Max(range, Math.Abs(x[b * block + i]));
            for (int i = 0; i < block; i++)
            {
                double e = Math.Abs(back[b * block + i] - x[b * block + i]);
                Assert.True(e <= 2 * range * relativeStep, $"{type}: error {e} in a block of range {range}");
                errSq += e * e;
                sumSq += range * relativeStep * range * relativeStep;
            }
        }
        // Rounding to the nearest level leaves a mean squared error near step²/12; a quarter of step² would be a bug.
        Assert.True(errSq / sumSq < 0.25, $"{type}: mean squared error {errSq / sumSq} step²");
    }

    [Fact]
    public void All_zero_blocks_quantize_to_zero_bytes()
    {
        foreach (var t in new[] { GgmlType.Q8_0, GgmlType.Q4_K, GgmlType.Q5_K, GgmlType.Q6_K })
        {
            var y = new byte[t.RowBytes(256)];
            Array.Fill(y, (byte)0xAA);
            GgmlQuantizer.Quantize(t, new float[256], 256, y);
            var back = new float[256];
            GgmlDequantizer.Dequantize(t, y, back);
            Assert.All(back, v => Assert.Equal(0f, v));
        }
    }

    internal static float[] RandomRows(Random rng, int count, int columns)
    {
        var x = new float[count];
        for (int i = 0; i < count; i++)
        {
            // Gaussian-ish weights with an occasional outlier, per-row scale varying.
            double u = rng.NextDouble() + rng.NextDouble() + rng.NextDouble() - 1.5;
            x[i] = (float)(u * 0.05 * (1 + i / columns) * (rng.Next(50) == 0 ? 6 : 1));
        }
        return x;
    }

    private static bool NearTie(double t) => Math.Abs(t - Math.Floor(t) - 0.5) < 1e-4;
}
