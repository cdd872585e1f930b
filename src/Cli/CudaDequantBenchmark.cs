using System.Runtime.InteropServices;
using QLora.Kernels;
using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// <c>qlora bench dequant --device cuda</c>: the ILGPU NF4 + double-quant → bf16 kernel on a CUDA device against a
/// device-to-device copy of the output's size, both timed with driver events on the default stream in the same run,
/// and the kernel's output compared bit for bit with the CPU dequantizer's. Needs only the NVIDIA driver (no libtorch).
/// </summary>
internal static class CudaDequantBenchmark
{
    public static unsafe void Run(int ordinal, long n, int blocksize, int repeats, TextWriter o)
    {
        CudaKernelLauncher launcher;
        try { launcher = CudaKernelLauncher.ForDevice(ordinal); }
        catch (CudaUnavailableException e) { throw new DeviceUnavailableException($"--device cuda:{ordinal}: {e.Message}", e); }
        var driver = launcher.Driver;
        launcher.MakeCurrent();

        long blocks = (n + blocksize - 1) / blocksize;
        long packedBytes = n / 2, outBytes = n * 2;
        byte* packed = (byte*)NativeMemory.AlignedAlloc((nuint)packedBytes, 64);
        byte* expected = (byte*)NativeMemory.AlignedAlloc((nuint)outBytes, 64);
        byte* actual = (byte*)NativeMemory.AlignedAlloc((nuint)outBytes, 64);
        var device = new List<ulong>();
        ulong Alloc(long bytes) { var p = driver.Allocate(bytes); device.Add(p); return p; }
        nint start = 0, end = 0;
        try
        {
            var nested = DequantBenchmark.RandomWeights(packed, n, blocksize);

            ulong dPacked = Alloc(packedBytes), dCodes = Alloc(nested.Codes.LongLength), dNested = Alloc(nested.Absmax.LongLength * 4),
                dMap = Alloc(nested.Map.LongLength * 4), dOut = Alloc(outBytes), dCopy = Alloc(outBytes);
            driver.CopyToDevice(dPacked, packed, packedBytes);
            fixed (byte* c = nested.Codes) driver.CopyToDevice(dCodes, c, nested.Codes.LongLength);
            fixed (float* a = nested.Absmax) driver.CopyToDevice(dNested, a, nested.Absmax.LongLength * 4);
            fixed (float* m = nested.Map) driver.CopyToDevice(dMap, m, nested.Map.LongLength * 4);
            driver.Check(driver.TryMemset(dCopy, 1, outBytes), "cuMemsetD8");

            var gpu = new FourBitPointers
            {
                Packed = (nint)dPacked, Count = n, Blocksize = blocksize, QuantType = QuantType.Nf4,
                AbsmaxCodes = (nint)dCodes, NestedAbsmax = (nint)dNested, NestedMap = (nint)dMap,
                Offset = nested.Offset, NestedBlocksize = nested.Blocksize,
            };
            var dequantizer = new CudaFourBitDequantizer(launcher);
            dequantizer.Dequantize(gpu, FloatType.BFloat16, (nint)dOut); // warm-up: PTX JIT, module load
            driver.CopyDeviceToDevice(dOut, dCopy, outBytes, 0);
            launcher.Synchronize();

            start = driver.CreateEvent();
            end = driver.CreateEvent();
            var dq = new List<double>();
            var copy = new List<double>();
            for (int i = 0; i < repeats; i++)
            {
                driver.RecordEvent(start, 0);
                dequantizer.Dequantize(gpu, FloatType.BFloat16, (nint)dOut);
                driver.RecordEvent(end, 0);
                dq.Add(driver.ElapsedMilliseconds(start, end) / 1e3);
                driver.RecordEvent(start, 0);
                driver.CopyDeviceToDevice(dCopy, dOut, outBytes, 0);
                driver.RecordEvent(end, 0);
                copy.Add(driver.ElapsedMilliseconds(start, end) / 1e3);
            }

            // Bit identity with the CPU path on the same input (the last launch wrote dOut before the copy read it).
            dequantizer.Dequantize(gpu, FloatType.BFloat16, (nint)dOut);
            launcher.Synchronize();
            driver.CopyToHost(actual, dOut, outBytes);
            fixed (byte* c = nested.Codes)
            fixed (float* a = nested.Absmax)
            fixed (float* m = nested.Map)
                FourBitDequantizer.Dequantize(new FourBitPointers
                {
                    Packed = (nint)packed, Count = n, Blocksize = blocksize, QuantType = QuantType.Nf4,
                    AbsmaxCodes = (nint)c, NestedAbsmax = (nint)a, NestedMap = (nint)m,
                    Offset = nested.Offset, NestedBlocksize = nested.Blocksize,
                }, FloatType.BFloat16, (nint)expected);
            long mismatches = 0;
            for (long i = 0; i < outBytes; i += 2)
                if (*(ushort*)(expected + i) != *(ushort*)(actual + i)) mismatches++;

            double dqS = BenchStatistics.Median(dq), cpS = BenchStatistics.Median(copy);
            long dequantBytes = packedBytes + blocks + nested.Absmax.LongLength * 4 + outBytes;
            long copyBytes = 2 * outBytes;
            double dqGbps = dequantBytes / dqS / 1e9, cpGbps = copyBytes / cpS / 1e9, ratio = dqGbps / cpGbps;
            string name = driver.DeviceName(launcher.Device);
            o.WriteLine($"device: cuda:{ordinal} {name}, {launcher.Architecture}, driver {driver.DriverVersion()}");
            o.WriteLine($"NF4 + double quant -> bf16, {n:N0} weights, blocksize {blocksize}, median of {repeats} (driver events on the default stream)");
            o.WriteLine($"  dequantize: {dqS * 1e3,8:F3} ms  {dqGbps,7:F1} GB/s  ({dequantBytes / 1e6:N0} MB moved)  {n / dqS / 1e9:F1} G weights/s");
            o.WriteLine($"  copy:       {cpS * 1e3,8:F3} ms  {cpGbps,7:F1} GB/s  ({copyBytes / 1e6:N0} MB moved: cuMemcpyDtoDAsync of the bf16 output's size)");
            o.WriteLine($"  ratio dequant/copy bandwidth: {ratio:F2} (target >= 0.80); bit-identical to the CPU dequantizer: {(mismatches == 0 ? "yes" : $"NO, {mismatches:N0} of {n:N0} weights differ")}");
            o.WriteLine(Json.Line(new
            {
                bench = "dequant", device = $"cuda:{ordinal}", gpu = name, weights = n, blocksize, repeats, dequant_s = dqS, copy_s = cpS,
                dequant_gbps = Math.Round(dqGbps, 3), copy_gbps = Math.Round(cpGbps, 3), ratio = Math.Round(ratio, 3),
                weights_per_s = Math.Round(n / dqS), bit_identical = mismatches == 0, mismatches, arch = launcher.Architecture.ToString(),
            }));
        }
        finally
        {
            launcher.MakeCurrent();
            if (start != 0) driver.DestroyEvent(start);
            if (end != 0) driver.DestroyEvent(end);
            foreach (var p in device) driver.Free(p);
            NativeMemory.AlignedFree(packed);
            NativeMemory.AlignedFree(expected);
            NativeMemory.AlignedFree(actual);
        }
    }
}
