using QLora.Quant;

namespace QLora.Kernels.Tests;

public class LauncherArgumentTests
{
    [Fact]
    public unsafe void ArgumentsHoldValuesAtTheirPointers()
    {
        using var args = new KernelArguments(4);
        args.Scalar(7).View(0x1234_5678_9ABCUL, 99).Scalar(1.5f).Scalar(-3L);
        Assert.Equal([4, 16, 4, 8], args.Sizes);
        Assert.Equal(7, *(int*)args.Pointers[0]);
        Assert.Equal(0x1234_5678_9ABCUL, *(ulong*)args.Pointers[1]);
        Assert.Equal(99L, *((long*)args.Pointers[1] + 1));
        Assert.Equal(1.5f, *(float*)args.Pointers[2]);
        Assert.Equal(-3L, *(long*)args.Pointers[3]);
        Assert.Throws<InvalidOperationException>(() => args.Scalar(1));
    }

    [Fact]
    public unsafe void DequantizeArgumentsDescribeTheBuffers()
    {
        var source = new FourBitPointers
        {
            Packed = 0x1000, Count = 1001, Blocksize = 64, QuantType = QuantType.Nf4,
            AbsmaxCodes = 0x3000, NestedAbsmax = 0x4000, NestedMap = 0x5000, NestedBlocksize = 256, Offset = 0.25f,
        };
        using var args = CudaFourBitDequantizer.BuildArguments(source, FloatType.BFloat16, 0x6000, 0x7000);
        long View(int i, int field) => *((long*)args.Pointers[i] + field);
        Assert.Equal(32, *(int*)args.Pointers[0]); // ceil(1001 / 32) threads
        Assert.Equal((0x1000, 501 / 16), (View(1, 0), View(1, 1))); // packed as 16-byte units
        Assert.Equal((0x1000, 501), (View(2, 0), View(2, 1))); // packed bytes
        Assert.Equal((0x3000, 16), (View(3, 0), View(3, 1))); // 16 absmax codes
        Assert.Equal((0x4000, 1), (View(4, 0), View(4, 1)));
        Assert.Equal((0x5000, 256), (View(5, 0), View(5, 1)));
        Assert.Equal(0.25f, *(float*)args.Pointers[6]);
        Assert.Equal(256, *(int*)args.Pointers[7]);
        Assert.Equal((0x7000, 16), (View(8, 0), View(8, 1))); // code table
        Assert.Equal((0x6000, 2002 / 16), (View(9, 0), View(9, 1)));
        Assert.Equal((0x6000, 1001), (View(10, 0), View(10, 1)));
        Assert.Equal(1001L, *(long*)args.Pointers[11]);
        Assert.Equal(64, *(int*)args.Pointers[12]);
    }

    [Fact]
    public void KernelNamesFollowTheSource()
    {
        Assert.Equal("DequantizeNestedBf16", CudaFourBitDequantizer.KernelName(true, FloatType.BFloat16));
        Assert.Equal("DequantizeF32", CudaFourBitDequantizer.KernelName(false, FloatType.Float32));
        Assert.Equal("AdamW8bitUpdateBf16", CudaAdamW8bit.KernelName(FloatType.BFloat16));
        Assert.Throws<NotSupportedException>(() => CudaAdamW8bit.KernelName(FloatType.Float16));
        Assert.All(new[] { "DequantizeNestedBf16", "DequantizeF32", "AdamW8bitUpdateBf16" }, n => KernelCatalog.Get(n));
        Assert.Throws<KeyNotFoundException>(() => KernelCatalog.Get("Nope"));
    }

    [Fact]
    public void StepScalarsFollowTheFormulas()
    {
        var s = AdamW8bitStep.Create(lr: 2e-4f, beta1: 0.9f, beta2: 0.999f, eps: 1e-8f, weightDecay: 0.1f, step: 1);
        float c1 = 1f - 0.9f, c2 = MathF.Sqrt(1f - 0.999f);
        Assert.Equal(-2e-4f * c2 / c1, s.StepSize);
        Assert.Equal(c2 * 1e-8f, s.EpsilonTerm);
        Assert.Equal(1f - 2e-4f * 0.1f, s.DecayFactor);
        Assert.Equal(1f - 0.9f, s.OneMinusBeta1);
        Assert.Throws<ArgumentOutOfRangeException>(() => AdamW8bitStep.Create(1e-3f, 0.9f, 0.999f, 1e-8f, 0f, 0));
    }
}
