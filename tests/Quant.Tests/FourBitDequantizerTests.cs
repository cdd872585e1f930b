using System.Runtime.InteropServices;

namespace QLora.Quant.Tests;

public class FourBitDequantizerTests
{
    public static IEnumerable<object[]> Paths()
    {
        yield return [FourBitDequantizer.Path.Scalar];
        if (System.Runtime.Intrinsics.X86.Ssse3.IsSupported) yield return [FourBitDequantizer.Path.Ssse3];
        if (System.Runtime.Intrinsics.X86.Avx512BW.IsSupported) yield return [FourBitDequantizer.Path.Avx512];
    }

    /// <summary>Random normal data with NaN, ±inf, huge and tiny values and an all-zero block sprinkled in.</summary>
    private static float[] Awkward(int n, int seed)
    {
        var x = TestData.Randn(n, seed);
        var rng = new Random(seed + 1);
        for (int i = 0; i < n / 97; i++)
        {
            int k = rng.Next(n);
            x[k] = (i % 5) switch { 0 => float.NaN, 1 => 1e30f, 2 => 1e-30f, 3 => -0f, _ => x[k] * 1000 };
        }
        if (n > 200) Array.Clear(x, 64, 128);
        if (n > 5000 && seed % 2 == 0) x[4000] = float.PositiveInfinity;
        return x;
    }

    [Theory]
    [MemberData(nameof(Paths))]
    public void FastPathEqualsTheScalarReferenceBitForBit(FourBitDequantizer.Path path)
    {
        int[] sizes = [1, 2, 3, 31, 32, 33, 63, 65, 127, 1001, 4097, 12345];
        int[] blocksizes = [32, 64, 128, 256, 512, 1024, 2048, 4096];
        int seed = 0;
        foreach (var n in sizes)
        foreach (var bs in blocksizes)
        foreach (var type in new[] { QuantType.Nf4, QuantType.Fp4 })
        foreach (var dq in new[] { true, false })
        {
            var q = FourBitQuantizer.Quantize(Awkward(n, ++seed), [n], type, bs, dq);
            foreach (var outType in new[] { FloatType.Float32, FloatType.BFloat16, FloatType.Float16 })
                AssertSame(q, outType, path, $"n={n} bs={bs} {type} dq={dq} {outType}");
        }
    }

    [Theory]
    [MemberData(nameof(Paths))]
    public void LargeOddTensorsEqualTheReference(FourBitDequantizer.Path path)
    {
        foreach (var (n, bs) in new[] { (1_000_001, 64), (777_777, 32), (524_289, 4096) })
        {
            var q = FourBitQuantizer.Quantize(Awkward(n, n), [n], QuantType.Nf4, bs, doubleQuant: true);
            foreach (var outType in new[] { FloatType.BFloat16, FloatType.Float32 })
                AssertSame(q, outType, path, $"n={n} bs={bs} {outType}");
        }
    }

    [Fact]
    public unsafe void LargeAlignedOutputsDecodedInParallelWithStreamingStoresStayIdentical()
    {
        const int n = (int)FourBitDequantizer.ParallelThreshold + 33; // multi-threaded, past the non-temporal threshold, partial last block
        var q = FourBitQuantizer.Quantize(Awkward(n, 77), [n], QuantType.Nf4, 64, doubleQuant: true);
        var expected = new byte[n * 2];
        FourBitReferenceDequantizer.Dequantize(q, FloatType.BFloat16, expected);
        byte* aligned = (byte*)NativeMemory.AlignedAlloc((nuint)(n * 2), 64);
        try
        {
            fixed (byte* packed = q.Packed)
            fixed (byte* codes = q.State.Nested!.Codes)
            fixed (float* absmax2 = q.State.Nested.Absmax)
            fixed (float* map = q.State.Nested.Map)
            {
                FourBitDequantizer.Dequantize(new FourBitPointers
                {
                    Packed = (nint)packed, Count = n, Blocksize = 64, QuantType = QuantType.Nf4,
                    AbsmaxCodes = (nint)codes, NestedAbsmax = (nint)absmax2, NestedMap = (nint)map,
                    Offset = q.State.Nested.Offset, NestedBlocksize = 256,
                }, FloatType.BFloat16, (nint)aligned);
            }
            Assert.True(new ReadOnlySpan<byte>(aligned, n * 2).SequenceEqual(expected));
        }
        finally { NativeMemory.AlignedFree(aligned); }
    }

    [Fact]
    public void WritesNothingPastTheEndOfTheDestination()
    {
        var q = FourBitQuantizer.Quantize(TestData.Randn(33, 1), [33], QuantType.Nf4, 32);
        var buffer = new byte[33 * 2 + 16];
        Array.Fill(buffer, (byte)0xAB);
        FourBitDequantizer.Dequantize(q, FloatType.BFloat16, buffer);
        for (int i = 66; i < buffer.Length; i++) Assert.Equal(0xAB, buffer[i]);
        Assert.Throws<ArgumentException>(() => FourBitDequantizer.Dequantize(q, FloatType.BFloat16, new byte[65]));
    }

    private static void AssertSame(QuantizedTensor q, FloatType outType, FourBitDequantizer.Path path, string what)
    {
        long n = q.Count;
        var expected = new byte[n * outType.Size()];
        var actual = new byte[n * outType.Size()];
        FourBitReferenceDequantizer.Dequantize(q, outType, expected);
        FourBitDequantizer.Dequantize(q, outType, actual, path);
        if (!expected.AsSpan().SequenceEqual(actual))
        {
            int i = 0;
            while (expected[i] == actual[i]) i++;
            Assert.Fail($"{what} {path}: first difference at byte {i} (element {i / outType.Size()})");
        }
    }
}
