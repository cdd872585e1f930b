namespace QLora.Quant.Tests;

public class DoubleQuantizerTests
{
    [Fact]
    public void OffsetIsTheMeanInDoubleAndCodesAreTheNearestMapEntries()
    {
        var rng = new Random(5);
        var absmax = new float[1000];
        for (int i = 0; i < absmax.Length; i++) absmax[i] = (float)(rng.NextDouble() * 3);
        var nested = DoubleQuantizer.Quantize(absmax);

        double sum = 0;
        foreach (var a in absmax) sum += a;
        Assert.Equal((float)(sum / absmax.Length), nested.Offset);
        Assert.Equal(4, nested.Absmax.Length);
        Assert.Equal(256, nested.Blocksize);

        var map = DynamicMap.Signed;
        for (int b = 0; b < 4; b++)
        {
            int start = b * 256, len = Math.Min(256, absmax.Length - start);
            float m = 0;
            for (int i = 0; i < len; i++) m = Math.Max(m, Math.Abs(absmax[start + i] - nested.Offset));
            Assert.Equal(m, nested.Absmax[b]);
            float inv = 1f / m;
            for (int i = 0; i < len; i++)
            {
                float x = (absmax[start + i] - nested.Offset) * inv;
                // Brute force in double: the nearest entry, ties to the even index.
                int best = 0;
                for (int k = 1; k < 256; k++)
                {
                    double dk = Math.Abs((double)map[k] - x), db = Math.Abs((double)map[best] - x);
                    if (dk < db || (dk == db && k % 2 == 0)) best = k;
                }
                Assert.Equal(best, nested.Codes[start + i]);
            }
        }
    }

    [Fact]
    public void DecodingUsesTwoSeparateFloat32Roundings()
    {
        var absmax = TestData.Randn(5000, seed: 9).Select(MathF.Abs).ToArray();
        var nested = DoubleQuantizer.Quantize(absmax);
        var decoded = nested.Decode();
        for (int i = 0; i < absmax.Length; i++)
        {
            // Each step rounded to float32 from an exact double: no fused multiply-add.
            float a = (float)((double)nested.Map[nested.Codes[i]] * nested.Absmax[i / 256]);
            float expected = (float)((double)a + nested.Offset);
            Assert.Equal(expected, decoded[i]);
            Assert.True(Math.Abs(decoded[i] - absmax[i]) <= 0.02 * nested.Absmax[i / 256] + 1e-7);
        }
    }

    [Fact]
    public void ABlockOfIdenticalAbsmaxDecodesExactlyToTheOffset()
    {
        var absmax = Enumerable.Repeat(0.75f, 300).ToArray();
        var nested = DoubleQuantizer.Quantize(absmax);
        Assert.All(nested.Decode(), v => Assert.Equal(0.75f, v));
    }

    [Fact]
    public void DoubleQuantizationStoresAbout4Point127BitsPerWeight()
    {
        var x = TestData.Randn(64 * 256 * 4, seed: 1);
        var q = FourBitQuantizer.Quantize(x, [x.Length], QuantType.Nf4, 64, doubleQuant: true);
        double bitsPerWeight = 8.0 * (q.Packed.Length + q.State.Nested!.Codes.Length + q.State.Nested.Absmax.Length * 4) / x.Length;
        Assert.Equal(4.127, bitsPerWeight, 3);
        var plain = FourBitQuantizer.Quantize(x, [x.Length], QuantType.Nf4, 64, doubleQuant: false);
        Assert.Equal(4.5, 8.0 * (plain.Packed.Length + plain.State.Absmax!.Length * 4) / x.Length, 3);
    }
}
