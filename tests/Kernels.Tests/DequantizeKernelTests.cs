using QLora.Quant;

namespace QLora.Kernels.Tests;

[Collection(CpuAcceleratorCollection.Name)]
public class DequantizeKernelTests(CpuAcceleratorFixture fixture)
{
    public static TheoryData<int, QuantType, bool, FloatType> EveryBlocksize()
    {
        var data = new TheoryData<int, QuantType, bool, FloatType>();
        for (int bs = 32; bs <= 4096; bs *= 2)
            foreach (var type in new[] { QuantType.Nf4, QuantType.Fp4 })
                foreach (var dq in new[] { false, true })
                    foreach (var output in new[] { FloatType.BFloat16, FloatType.Float16, FloatType.Float32 })
                        data.Add(bs, type, dq, output);
        return data;
    }

    [Theory]
    [MemberData(nameof(EveryBlocksize))]
    public void KernelEqualsReference(int blocksize, QuantType type, bool doubleQuant, FloatType output)
    {
        // Odd length: two full blocks, a partial block, a partial 32-element chunk and an odd padding nibble.
        int count = 2 * blocksize + 45;
        AssertBitIdentical(TestData.Quantize(count, blocksize, type, doubleQuant, specials: false, seed: blocksize), output);
    }

    [Theory]
    [InlineData(32)]
    [InlineData(64)]
    [InlineData(4096)]
    public void ZeroBlocksNaNAndInfinityMatchReference(int blocksize)
    {
        foreach (var type in new[] { QuantType.Nf4, QuantType.Fp4 })
            foreach (var dq in new[] { false, true })
                foreach (var output in new[] { FloatType.BFloat16, FloatType.Float16, FloatType.Float32 })
                    AssertBitIdentical(TestData.Quantize(3 * blocksize + 7, blocksize, type, dq, specials: true), output);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(31)]
    [InlineData(32)]
    [InlineData(33)]
    [InlineData(1000)]
    [InlineData(64 * 256 + 101)] // more than one nested (256-block) absmax group
    public void ShortAndLongLengthsMatchReference(int count)
    {
        foreach (var output in new[] { FloatType.BFloat16, FloatType.Float16, FloatType.Float32 })
            AssertBitIdentical(TestData.Quantize(count, 64, QuantType.Nf4, doubleQuant: true, specials: false, seed: count), output);
    }

    [Fact]
    public void PlainAbsmaxWithNaNAndInfinityEntriesMatchesReference()
    {
        // A file may hold any absmax; decoding must still agree bit for bit.
        var t = TestData.Quantize(5 * 64, 64, QuantType.Nf4, doubleQuant: false, specials: false);
        t.State.Absmax![1] = float.NaN;
        t.State.Absmax![2] = float.PositiveInfinity;
        t.State.Absmax![3] = 0f;
        t.State.Absmax![4] = 1e-42f; // subnormal
        foreach (var output in new[] { FloatType.BFloat16, FloatType.Float16, FloatType.Float32 })
            AssertBitIdentical(t, output);
    }

    private void AssertBitIdentical(QuantizedTensor tensor, FloatType output)
    {
        int bytes = (int)tensor.Count * output.Size();
        var expected = new byte[bytes];
        var actual = new byte[bytes];
        FourBitReferenceDequantizer.Dequantize(tensor, output, expected);
        fixture.Runner.Dequantize(tensor, output, actual);
        int size = output.Size();
        for (int i = 0; i < bytes; i += size)
        {
            if (!expected.AsSpan(i, size).SequenceEqual(actual.AsSpan(i, size)))
                Assert.Fail($"{tensor.State.QuantType} bs={tensor.State.Blocksize} dq={tensor.State.Nested != null} {output}: element {i / size} " +
                    $"expected {Convert.ToHexString(expected, i, size)} got {Convert.ToHexString(actual, i, size)}");
        }
    }
}
