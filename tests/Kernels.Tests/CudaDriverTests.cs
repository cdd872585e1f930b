using QLora.Quant;

namespace QLora.Kernels.Tests;

/// The driver binding on whatever machine runs the tests: without a GPU the CUDA paths must fail with a clear,
/// catchable error (and the GPU-only tests skip); with one they must work.
public class CudaDriverTests
{
    [Fact]
    public void CpuFactoryNeedsNoDriver()
    {
        var d = FourBitDequantizers.Create(DeviceKind.Cpu);
        Assert.Equal(DeviceKind.Cpu, d.Device);
        Assert.Same(CpuFourBitDequantizer.Instance, d);
    }

    [Fact]
    public void TryGetSharedNeverThrows()
    {
        bool ok = CudaDriver.TryGetShared(out var driver, out var reason);
        Assert.Equal(ok, driver != null);
        Assert.Equal(ok, reason == null);
    }

    [SkippableFact]
    public void CudaFactoryExplainsAMissingDriver()
    {
        Skip.If(CudaDriver.TryGetShared(out _, out _), "a CUDA device is present here");
        var e = Assert.Throws<CudaUnavailableException>(() => FourBitDequantizers.Create(DeviceKind.Cuda));
        Assert.Contains("CPU", e.Message); // says what to do
        Assert.True(e.Message.Contains("libcuda", StringComparison.Ordinal) || e.Message.Contains("cuInit", StringComparison.Ordinal)
            || e.Message.Contains("device", StringComparison.Ordinal), e.Message); // says what is missing
    }

    [SkippableFact]
    public unsafe void AnAsyncCopyOnACopyStreamWaitsForTheComputeStreamsEvent()
    {
        // Layer streaming's protocol: the compute stream (0) writes a slot, records an event; a copy on a non-blocking
        // stream that waits for that event lands after it, and synchronizing the copy's event makes it visible.
        Skip.IfNot(CudaDriver.TryGetShared(out var driver, out var reason), reason);
        var launcher = CudaKernelLauncher.ForDevice(0);
        launcher.MakeCurrent();
        const int Bytes = 1 << 20;
        ulong slot = driver!.Allocate(Bytes);
        nint staging = driver.AllocateHost(Bytes);
        nint stream = driver.CreateStream(CudaDriver.StreamNonBlocking);
        nint released = driver.CreateEvent(CudaDriver.EventDisableTiming), ready = driver.CreateEvent(CudaDriver.EventDisableTiming);
        try
        {
            new Span<byte>((void*)staging, Bytes).Fill(7);
            Assert.Equal(0, driver.TryMemset(slot, 1, Bytes)); // compute's last use of the slot
            driver.RecordEvent(released, 0);
            driver.StreamWaitEvent(stream, released);
            driver.CopyToDeviceAsync(slot, (void*)staging, Bytes, stream);
            driver.RecordEvent(ready, stream);
            driver.SynchronizeEvent(ready);
            var back = new byte[Bytes];
            fixed (byte* b = back) driver.CopyToHost(b, slot, Bytes);
            Assert.All(back, v => Assert.Equal(7, v));
        }
        finally
        {
            driver.DestroyEvent(released);
            driver.DestroyEvent(ready);
            driver.DestroyStream(stream);
            driver.FreeHost(staging);
            driver.Free(slot);
        }
    }

    [SkippableFact]
    public unsafe void CudaDequantizerMatchesReferenceOnTheDevice()
    {
        Skip.IfNot(CudaDriver.TryGetShared(out var driver, out var reason), reason);
        var launcher = CudaKernelLauncher.ForDevice(0);
        var t = TestData.Quantize(64 * 300 + 17, 64, QuantType.Nf4, doubleQuant: true, specials: false);
        var n = t.State.Nested!;
        launcher.MakeCurrent();
        ulong Upload<T>(T[] data) where T : unmanaged
        {
            ulong p = driver!.Allocate(data.Length * sizeof(T));
            fixed (T* d = data) driver.CopyToDevice(p, d, data.Length * sizeof(T));
            return p;
        }
        ulong packed = Upload(t.Packed), codes = Upload(n.Codes), absmax2 = Upload(n.Absmax), map = Upload(n.Map);
        ulong output = driver!.Allocate(t.Count * 2);
        try
        {
            new CudaFourBitDequantizer(launcher).Dequantize(new FourBitPointers
            {
                Packed = (nint)packed, Count = t.Count, Blocksize = 64, QuantType = QuantType.Nf4, AbsmaxCodes = (nint)codes,
                NestedAbsmax = (nint)absmax2, NestedMap = (nint)map, Offset = n.Offset, NestedBlocksize = n.Blocksize,
            }, FloatType.BFloat16, (nint)output);
            launcher.Synchronize();
            var actual = new byte[t.Count * 2];
            fixed (byte* a = actual) driver.CopyToHost(a, output, actual.Length);
            var expected = new byte[actual.Length];
            FourBitReferenceDequantizer.Dequantize(t, FloatType.BFloat16, expected);
            Assert.Equal(expected, actual);
        }
        finally
        {
            foreach (var p in new[] { packed, codes, absmax2, map, output }) driver.Free(p);
        }
    }

    [Fact]
    public void ValidateRejectsNullAndMisalignedAddresses()
    {
        var ok = new FourBitPointers { Packed = 0x1000, Count = 100, Blocksize = 64, QuantType = QuantType.Nf4, Absmax = 0x2000 };
        CudaFourBitDequantizer.Validate(ok, 0x3000);
        Assert.Throws<ArgumentException>(() => CudaFourBitDequantizer.Validate(ok, 0));
        Assert.Throws<ArgumentException>(() => CudaFourBitDequantizer.Validate(ok with { Packed = 0x1008 }, 0x3000));
        Assert.Throws<ArgumentException>(() => CudaFourBitDequantizer.Validate(ok, 0x3002));
        Assert.Throws<ArgumentException>(() => CudaFourBitDequantizer.Validate(ok with { Absmax = 0 }, 0x3000));
        Assert.Throws<ArgumentOutOfRangeException>(() => CudaFourBitDequantizer.Validate(ok with { Blocksize = 48 }, 0x3000));
    }
}
