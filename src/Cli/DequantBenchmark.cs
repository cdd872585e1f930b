using System.CommandLine;
using System.Diagnostics;
using System.Runtime.InteropServices;
using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// <c>qlora bench dequant</c>: NF4 + double-quant → bf16 throughput of the CPU dequantizer against a plain parallel
/// memory copy of the output's size on the same machine in the same run.
/// </summary>
internal static class DequantBenchmark
{
    public static Command Create(TextWriter stdout)
    {
        var weights = new Option<long>("--weights") { Description = "number of weights (default 256M)", DefaultValueFactory = _ => 256L << 20 };
        var blocksize = new Option<int>("--blocksize") { Description = "absmax blocksize", DefaultValueFactory = _ => 64 };
        var repeats = new Option<int>("--repeats") { Description = "timed runs (median reported)", DefaultValueFactory = _ => 9 };
        var device = DeviceOptions.Device("cpu (the vectorised C# path), cuda or cuda:N (the ILGPU kernel; needs only the NVIDIA driver), or auto (a CUDA device when the driver has one, else the CPU)");
        var cmd = new Command("dequant", "NF4+double-quant -> bf16 dequantization vs a memory copy on the same device (CPU or CUDA).") { weights, blocksize, repeats, device };
        cmd.SetAction(r =>
        {
            long n = r.GetValue(weights);
            int bs = r.GetValue(blocksize), reps = r.GetValue(repeats);
            if (n < 1024 || n % 2 != 0) throw new ArgumentException($"--weights {n}: must be an even number of at least 1024");
            if (reps < 1) throw new ArgumentException($"--repeats {reps}: must be at least 1");
            QuantTypes.ValidateBlocksize(bs);
            var request = DeviceRequest.Parse(r.GetValue(device), "--device");
            if (request.Kind == DeviceRequestKind.Auto && QLora.Kernels.CudaDriver.TryGetShared(out _, out _)) request = new DeviceRequest(DeviceRequestKind.Cuda, 0);
            if (request.Kind == DeviceRequestKind.Cuda) CudaDequantBenchmark.Run(request.Ordinal, n, bs, reps, stdout);
            else Run(n, bs, reps, stdout);
            return 0;
        });
        return cmd;
    }

    private static unsafe void Run(long n, int blocksize, int repeats, TextWriter o)
    {
        // Random codes and a double-quantized absmax: throughput does not depend on the values.
        long blocks = (n + blocksize - 1) / blocksize;
        long packedBytes = n / 2, outBytes = n * 2;
        byte* packed = (byte*)NativeMemory.AlignedAlloc((nuint)packedBytes, 64);
        byte* output = (byte*)NativeMemory.AlignedAlloc((nuint)outBytes, 64);
        byte* copySrc = (byte*)NativeMemory.AlignedAlloc((nuint)outBytes, 64);
        try
        {
            var nested = RandomWeights(packed, n, blocksize);
            new Span<byte>(copySrc, (int)Math.Min(outBytes, int.MaxValue)).Fill(1);

            fixed (byte* codes = nested.Codes)
            fixed (float* absmax2 = nested.Absmax)
            fixed (float* map = nested.Map)
            {
                var src = new FourBitPointers
                {
                    Packed = (nint)packed, Count = n, Blocksize = blocksize, QuantType = QuantType.Nf4,
                    AbsmaxCodes = (nint)codes, NestedAbsmax = (nint)absmax2, NestedMap = (nint)map,
                    Offset = nested.Offset, NestedBlocksize = nested.Blocksize,
                };
                long dequantBytes = packedBytes + blocks + nested.Absmax.LongLength * 4 + outBytes;
                long copyBytes = 2 * outBytes; // read + write

                var dq = new List<double>();
                var memmove = new List<double>();
                var stream = new List<double>();
                FourBitDequantizer.Dequantize(src, FloatType.BFloat16, (nint)output); // warm-up (page faults, JIT)
                ParallelCopy(copySrc, output, outBytes, streaming: false);
                ParallelCopy(copySrc, output, outBytes, streaming: true);
                for (int i = 0; i < repeats; i++)
                {
                    // Interleaved so that machine noise hits all measurements alike.
                    var sw = Stopwatch.StartNew();
                    FourBitDequantizer.Dequantize(src, FloatType.BFloat16, (nint)output);
                    dq.Add(sw.Elapsed.TotalSeconds);
                    sw.Restart();
                    ParallelCopy(copySrc, output, outBytes, streaming: false);
                    memmove.Add(sw.Elapsed.TotalSeconds);
                    sw.Restart();
                    ParallelCopy(copySrc, output, outBytes, streaming: true);
                    stream.Add(sw.Elapsed.TotalSeconds);
                }
                // The copy baseline is the faster of memmove and a non-temporal streaming copy: the machine's best.
                double dqS = BenchStatistics.Median(dq), cpS = Math.Min(BenchStatistics.Median(memmove), BenchStatistics.Median(stream));
                double dqGbps = dequantBytes / dqS / 1e9, cpGbps = copyBytes / cpS / 1e9;
                double ratio = dqGbps / cpGbps;
                string cpu = CpuName();
                o.WriteLine($"machine: {cpu}, {Environment.ProcessorCount} threads, SIMD path {FourBitDequantizer.BestPath}");
                o.WriteLine($"NF4 + double quant -> bf16, {n:N0} weights, blocksize {blocksize}, median of {repeats}");
                o.WriteLine($"  dequantize: {dqS * 1e3,8:F1} ms  {dqGbps,6:F2} GB/s  ({dequantBytes / 1e6:N0} MB moved: packed + absmax read, bf16 written)  {n / dqS / 1e9:F2} G weights/s");
                o.WriteLine($"  copy:       {cpS * 1e3,8:F1} ms  {cpGbps,6:F2} GB/s  ({copyBytes / 1e6:N0} MB moved: bf16-sized buffer read + written; best of memmove {BenchStatistics.Median(memmove) * 1e3:F1} ms and streaming copy {BenchStatistics.Median(stream) * 1e3:F1} ms)");
                o.WriteLine($"  ratio dequant/copy bandwidth: {ratio:F2} (target >= 0.80)");
                o.WriteLine(Json.Line(new
                {
                    bench = "dequant", device = "cpu", weights = n, blocksize, repeats, dequant_s = dqS, copy_s = cpS, memmove_s = BenchStatistics.Median(memmove), stream_copy_s = BenchStatistics.Median(stream),
                    dequant_gbps = Math.Round(dqGbps, 3), copy_gbps = Math.Round(cpGbps, 3), ratio = Math.Round(ratio, 3),
                    weights_per_s = Math.Round(n / dqS), path = FourBitDequantizer.BestPath.ToString(), threads = Environment.ProcessorCount, cpu,
                }));
            }
        }
        finally
        {
            NativeMemory.AlignedFree(packed);
            NativeMemory.AlignedFree(output);
            NativeMemory.AlignedFree(copySrc);
        }
    }

    /// <summary>
    /// Fills <paramref name="packed"/> (n/2 bytes) with random codes and returns a double-quantized random absmax for
    /// them: throughput does not depend on the values, and both devices measure the same input.
    /// </summary>
    internal static unsafe NestedAbsmax RandomWeights(byte* packed, long n, int blocksize)
    {
        var rng = new Random(1234);
        long packedBytes = n / 2, blocks = (n + blocksize - 1) / blocksize;
        for (long i = 0; i < packedBytes; i += int.MaxValue) rng.NextBytes(new Span<byte>(packed + i, (int)Math.Min(int.MaxValue, packedBytes - i)));
        var absmax = new float[blocks];
        for (long b = 0; b < blocks; b++) absmax[b] = 0.01f + (float)rng.NextDouble();
        return DoubleQuantizer.Quantize(absmax);
    }

    private static unsafe void ParallelCopy(byte* src, byte* dst, long bytes, bool streaming)
    {
        int parts = Environment.ProcessorCount * 4;
        long chunk = (bytes / parts + 63) & ~63L;
        bool nt = streaming && System.Runtime.Intrinsics.X86.Avx512F.IsSupported;
        Parallel.For(0, parts, i =>
        {
            long start = i * chunk;
            long len = Math.Min(chunk, bytes - start);
            if (len <= 0) return;
            if (!nt) { Buffer.MemoryCopy(src + start, dst + start, len, len); return; }
            byte* s = src + start, d = dst + start;
            long k = 0;
            for (; k + 64 <= len; k += 64)
                System.Runtime.Intrinsics.X86.Avx512F.StoreAlignedNonTemporal(d + k, System.Runtime.Intrinsics.Vector512.LoadAligned(s + k));
            if (k < len) Buffer.MemoryCopy(s + k, d + k, len - k, len - k);
            System.Runtime.Intrinsics.X86.Sse.StoreFence();
        });
    }

    internal static string CpuName()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/cpuinfo"))
                if (line.StartsWith("model name", StringComparison.Ordinal)) return line[(line.IndexOf(':') + 1)..].Trim();
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return RuntimeInformation.ProcessArchitecture.ToString();
    }
}
