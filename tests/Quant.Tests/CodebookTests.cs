namespace QLora.Quant.Tests;

public class CodebookTests
{
    // The float32 bit patterns of the NF4 table, from the published format (spec §1).
    private static readonly uint[] Nf4Bits =
    [
        0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
        0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
    ];

    [Fact]
    public void Nf4TableHasThePublishedBits()
    {
        for (int c = 0; c < 16; c++)
            Assert.Equal(Nf4Bits[c], BitConverter.SingleToUInt32Bits(Nf4Codebook.Values[c]));
    }

    [Fact]
    public void Nf4ThresholdsAreMidpointsAndTiesGoToTheLowerCode()
    {
        var v = Nf4Codebook.Values;
        var t = Nf4Codebook.Thresholds;
        for (int i = 0; i < 15; i++)
        {
            Assert.Equal(((double)v[i] + v[i + 1]) / 2, t[i], 6);
            Assert.Equal(i, Nf4Codebook.Encode(t[i]));                       // exactly at a threshold: lower code
            Assert.Equal(i + 1, Nf4Codebook.Encode(MathF.BitIncrement(t[i]))); // just above: upper code
        }
        for (int c = 0; c < 16; c++) Assert.Equal(c, Nf4Codebook.Encode(v[c]));
        Assert.Equal(0, Nf4Codebook.Encode(float.NaN));
        Assert.Equal(0, Nf4Codebook.Encode(-5f));
        Assert.Equal(15, Nf4Codebook.Encode(5f));
        Assert.Equal(7, Nf4Codebook.Encode(0f));
        Assert.Equal(7, Nf4Codebook.Encode(-0f));
    }

    [Fact]
    public void Fp4TableAndTreeMatchTheCudaKernel()
    {
        float[] expected = [0, 0.0625f / 12, 8f / 12, 1f, 4f / 12, 0.5f, 2f / 12, 0.25f];
        for (int c = 0; c < 8; c++)
        {
            Assert.Equal(expected[c], Fp4Codebook.Values[c]);
            Assert.Equal(-expected[c], Fp4Codebook.Values[c + 8]);
        }
        // Hand-evaluated against the tree's literals.
        Assert.Equal(3, Fp4Codebook.Encode(0.9f));
        Assert.Equal(2, Fp4Codebook.Encode(0.8333333f));      // not > 0.8333333
        Assert.Equal(5, Fp4Codebook.Encode(0.45f));
        Assert.Equal(4, Fp4Codebook.Encode(0.4166667f));
        Assert.Equal(7, Fp4Codebook.Encode(0.25f));
        Assert.Equal(6, Fp4Codebook.Encode(0.1f));
        Assert.Equal(1, Fp4Codebook.Encode(0.003f));
        Assert.Equal(0, Fp4Codebook.Encode(0.00260417f));
        Assert.Equal(8 + 3, Fp4Codebook.Encode(-1f));
        Assert.Equal(8 + 6, Fp4Codebook.Encode(-0.1f));
        Assert.Equal(0, Fp4Codebook.Encode(float.NaN));
    }

    [Fact]
    public void SignedDynamicMapMatchesItsConstructionWithinOneUlp()
    {
        // for i in 0..6: means of adjacent points of linspace(0.1, 1, 2^i + 1) times 10^(i-6), their negatives, 0 and 1.
        var values = new List<double> { 0.0, 1.0 };
        for (int i = 0; i <= 6; i++)
        {
            int n = (1 << i) + 1;
            for (int k = 0; k + 1 < n; k++)
            {
                double a = 0.1 + 0.9 * k / (n - 1), b = 0.1 + 0.9 * (k + 1) / (n - 1);
                double m = (a + b) / 2 * Math.Pow(10, i - 6);
                values.Add(m);
                values.Add(-m);
            }
        }
        values.Sort();
        Assert.Equal(256, values.Count);
        var map = DynamicMap.Signed;
        for (int k = 0; k < 256; k++)
        {
            float expected = (float)values[k];
            int ulps = Math.Abs(BitConverter.SingleToInt32Bits(map[k]) - BitConverter.SingleToInt32Bits(expected));
            Assert.True(ulps <= 1, $"entry {k}: {map[k]} vs {expected}");
        }
        Assert.Equal(0f, map[127]);
        Assert.Equal(1f, map[255]);
    }

    [Fact]
    public void UnsignedDynamicMapIsAscendingFromZeroToOne()
    {
        var map = DynamicMap.Unsigned;
        Assert.Equal(0f, map[0]);
        Assert.Equal(1f, map[255]);
        for (int k = 1; k < 256; k++) Assert.True(map[k] > map[k - 1]);
    }

    [Fact]
    public void DynamicMapNearestBreaksExactTiesToTheEvenIndex()
    {
        ReadOnlySpan<float> map = [0f, 1f, 2f, 4f, 8f];
        Assert.Equal(0, DynamicMap.Nearest(map, 0.5f));  // tie between 0 and 1 -> even 0
        Assert.Equal(2, DynamicMap.Nearest(map, 1.5f));  // tie between 1 and 2 -> even 2
        Assert.Equal(2, DynamicMap.Nearest(map, 3f));    // tie between 2 and 3 -> even 2
        Assert.Equal(4, DynamicMap.Nearest(map, 6f));    // tie between 3 and 4 -> even 4
        Assert.Equal(1, DynamicMap.Nearest(map, 1.49f));
        Assert.Equal(3, DynamicMap.Nearest(map, 3.01f));
        Assert.Equal(0, DynamicMap.Nearest(map, -7f));
        Assert.Equal(4, DynamicMap.Nearest(map, 70f));
        Assert.Equal(0, DynamicMap.Nearest(map, float.NaN));
    }

    [Fact]
    public void BFloat16RoundsToNearestEvenAndCanonicalisesNaN()
    {
        Assert.Equal(0x3F80, BFloat16.FromFloat(1f));
        Assert.Equal(0x3F80, BFloat16.FromFloat(BitConverter.UInt32BitsToSingle(0x3F808000))); // tie, even stays
        Assert.Equal(0x3F82, BFloat16.FromFloat(BitConverter.UInt32BitsToSingle(0x3F818000))); // tie, odd rounds up
        Assert.Equal(0x3F81, BFloat16.FromFloat(BitConverter.UInt32BitsToSingle(0x3F808001)));
        Assert.Equal(0x7F80, BFloat16.FromFloat(float.PositiveInfinity));
        Assert.Equal(0x7F80, BFloat16.FromFloat(float.MaxValue)); // rounds up to inf, as PyTorch
        Assert.Equal(0x7FC0, BFloat16.FromFloat(float.NaN));
        Assert.Equal(0x7FC0, BFloat16.FromFloat(BitConverter.UInt32BitsToSingle(0xFFC00001)));
        Assert.Equal(0x8000, BFloat16.FromFloat(-0f));
    }
}
