using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using QLora.Kernels;
using QLora.Quant;

namespace QLora.GpuCheck;

/// <summary>The checks that need an NVIDIA GPU: bit-identity and bandwidth of the dequantization kernel, runtime-API memory, and the private-context hazard.</summary>
internal sealed unsafe class GpuChecks(CheckReport report, CudaKernelLauncher launcher, int seed, int runs)
{
    private readonly CudaDriver _driver = launcher.Driver;
    private readonly CudaFourBitDequantizer _dequantizer = new(launcher);
    private const double TargetRatio = 0.80;

    public void DequantizeShape(int rows, int cols)
    {
        string name = $"nf4 dq {rows}x{cols} bf16";
        report.Run(name, () =>
        {
            var sw = Stopwatch.StartNew();
            var t = RandomWeights.Nf4DoubleQuant(rows, cols, seed + rows);
            long n = t.Count;
            launcher.MakeCurrent();
            using var device = new DeviceTensor(_driver, t);
            ulong output = _driver.Allocate(n * 2), scratch = _driver.Allocate(n * 2);
            try
            {
                _driver.TryMemset(output, 0xFF, n * 2);
                _dequantizer.Dequantize(device.Pointers, FloatType.BFloat16, (nint)output);
                launcher.Synchronize();
                var actual = new byte[n * 2];
                fixed (byte* a = actual) _driver.CopyToHost(a, output, actual.Length);
                var expected = new byte[n * 2];
                FourBitDequantizer.Dequantize(t, FloatType.BFloat16, expected);
                long mismatches = CountMismatches(expected, actual, out long first);

                // Timing on the default stream with events: median of `runs` after warm-up.
                var kernelMs = Time(() => _dequantizer.Dequantize(device.Pointers, FloatType.BFloat16, (nint)output));
                var copyMs = Time(() => _driver.CopyDeviceToDevice(scratch, output, n * 2, 0));
                double bytes = RandomWeights.BytesRead(t) + n * 2.0;
                double kernelGbps = bytes / (kernelMs * 1e-3) / 1e9;
                double copyGbps = 2.0 * n * 2 / (copyMs * 1e-3) / 1e9;
                double ratio = kernelGbps / copyGbps;
                report.Figures[$"{rows}x{cols}"] = new JsonObject
                {
                    ["elements"] = n, ["mismatches"] = mismatches, ["kernel_ms"] = Math.Round(kernelMs, 4), ["kernel_gbps"] = Math.Round(kernelGbps, 1),
                    ["copy_ms"] = Math.Round(copyMs, 4), ["copy_gbps"] = Math.Round(copyGbps, 1), ["ratio"] = Math.Round(ratio, 3),
                };
                report.Add(name + " bit-identical", mismatches == 0 ? Outcome.Pass : Outcome.Fail,
                    mismatches == 0 ? $"{n} elements equal the CPU reference" : $"{mismatches} of {n} elements differ (first at {first})");
                report.Add(name + " bandwidth", ratio >= TargetRatio ? Outcome.Pass : Outcome.Fail,
                    $"kernel {kernelMs:F3} ms = {kernelGbps:F0} GB/s; copy {copyMs:F3} ms = {copyGbps:F0} GB/s; ratio {ratio:F2} (target ≥ {TargetRatio:F2}); {sw.Elapsed.TotalSeconds:F1} s total");
            }
            finally
            {
                _driver.Free(output);
                _driver.Free(scratch);
            }
        });
    }

    public void RuntimeApiMemory(CudaRuntimeLibrary? cudart, string searched)
    {
        const string name = "cudaMalloc output (libtorch-style memory)";
        if (cudart == null)
        {
            report.Add(name, Outcome.Skip, $"no libcudart found (tried {searched}); set QLORA_CUDART=/path/to/libcudart.so");
            return;
        }
        report.Run(name, () =>
        {
            var t = RandomWeights.Nf4DoubleQuant(4096, 4096, seed + 7);
            long n = t.Count;
            launcher.MakeCurrent();
            cudart.SetDevice(launcher.Ordinal);
            using var device = new DeviceTensor(_driver, t);
            ulong output = cudart.Malloc(n * 2);
            try
            {
                nint owner = _driver.PointerContext(output);
                _dequantizer.Dequantize(device.Pointers, FloatType.BFloat16, (nint)output);
                launcher.Synchronize();
                var actual = new byte[n * 2];
                fixed (byte* a = actual) _driver.CopyToHost(a, output, actual.Length);
                var expected = new byte[n * 2];
                FourBitDequantizer.Dequantize(t, FloatType.BFloat16, expected);
                long mismatches = CountMismatches(expected, actual, out _);
                bool ok = mismatches == 0 && owner == launcher.Context;
                report.Figures["cudart"] = new JsonObject { ["path"] = cudart.Path, ["version"] = cudart.Version(), ["mismatches"] = mismatches, ["primary_context_owns_pointer"] = owner == launcher.Context };
                report.Add(name, ok ? Outcome.Pass : Outcome.Fail,
                    $"{cudart.Path} (runtime {cudart.Version()}): pointer owned by {(owner == launcher.Context ? "the primary context" : $"context 0x{owner:X}")}, {mismatches} mismatches");
            }
            finally
            {
                cudart.Free(output);
            }
        });
    }

    /// <summary>
    /// The hazard, shown: a stock ILGPU CudaAccelerator creates a private context (cuCtxCreate) and makes it current;
    /// runtime calls made afterwards land there, and kernels running there cannot touch primary-context memory.
    /// Run last: the private context is left faulted.
    /// </summary>
    public void PrivateContextHazard(CudaRuntimeLibrary? cudart)
    {
        report.Run("private context (stock ILGPU)", () =>
        {
            launcher.MakeCurrent();
            var t = RandomWeights.Nf4DoubleQuant(256, 4096, seed + 11);
            using var device = new DeviceTensor(_driver, t);
            ulong victim = cudart != null ? cudart.Malloc(t.Count * 2) : _driver.Allocate(t.Count * 2);

            RedirectIlgpuToDriver(_driver);
            using var context = ILGPU.Context.Create(b => b.Cuda());
            if (context.GetCudaDevices().Count == 0)
            {
                report.Add("private context (stock ILGPU)", Outcome.Skip, "ILGPU found no CUDA device (its libcuda lookup failed)");
                if (cudart != null) cudart.Free(victim); else _driver.Free(victim);
                return;
            }
            var accelerator = context.CreateCudaAccelerator(0);
            try
            {
                nint privateContext = _driver.CurrentContext();
                bool isPrivate = privateContext != launcher.Context && privateContext != 0;
                report.Add("ilgpu accelerator uses a private context", isPrivate ? Outcome.Pass : Outcome.Fail,
                    $"current after CreateCudaAccelerator: 0x{privateContext:X}; primary: 0x{launcher.Context:X}");

                if (cudart != null)
                {
                    ulong stray = cudart.Malloc(1 << 20);
                    nint owner = _driver.PointerContext(stray);
                    report.Add("runtime call after ILGPU lands in its context", Outcome.Info,
                        $"cudaMalloc on this thread now allocates in 0x{owner:X} ({(owner == privateContext ? "ILGPU's private context: torch would too" : "not ILGPU's context")})");
                    cudart.Free(stray);
                }

                // A stock ILGPU kernel, launched by ILGPU in its context, writing to primary-context memory, must fail.
                using var foreign = new ForeignMemoryBuffer(accelerator, victim, t.Count, sizeof(ushort));
                var view = foreign.AsArrayView<ushort>(0, t.Count);
                var fill = accelerator.LoadAutoGroupedStreamKernel<ILGPU.Index1D, ILGPU.ArrayView<ushort>>(FillKernel);
                string outcome;
                bool failed;
                try
                {
                    fill((int)t.Count, view);
                    accelerator.Synchronize();
                    outcome = "the write unexpectedly succeeded: revisit docs on the hazard";
                    failed = false;
                }
                catch (Exception e)
                {
                    outcome = $"{e.GetType().Name}: {e.Message} (as expected: contexts do not share allocations)";
                    failed = true;
                }
                report.Figures["private_context_write"] = failed ? "failed (expected)" : "succeeded (unexpected)";
                report.Add("stock ILGPU kernel on primary memory fails", failed ? Outcome.Pass : Outcome.Fail, outcome);
            }
            finally
            {
                try
                {
                    accelerator.Dispose();
                }
                catch (Exception e)
                {
                    Console.WriteLine($"(disposing the faulted ILGPU accelerator: {e.GetType().Name}: {e.Message})");
                }
                _driver.SetCurrentContext(launcher.Context);
            }

            // The primary context must be unaffected.
            var expected = new byte[t.Count * 2];
            FourBitDequantizer.Dequantize(t, FloatType.BFloat16, expected);
            _dequantizer.Dequantize(device.Pointers, FloatType.BFloat16, (nint)victim);
            launcher.Synchronize();
            var actual = new byte[expected.Length];
            fixed (byte* a = actual) _driver.CopyToHost(a, victim, actual.Length);
            long mismatches = CountMismatches(expected, actual, out _);
            report.Add("primary context healthy afterwards", mismatches == 0 ? Outcome.Pass : Outcome.Fail, $"{mismatches} mismatches after the private context faulted");
            if (cudart != null) cudart.Free(victim); else _driver.Free(victim);
        });
    }

    /// <summary>The stock ILGPU kernel of the hazard demonstration: writes 1.0 (bf16) everywhere.</summary>
    private static void FillKernel(ILGPU.Index1D i, ILGPU.ArrayView<ushort> output) => output[i] = 0x3F80;

    /// <summary>ILGPU imports "nvcuda"; on Linux point it at the libcuda.so.1 already loaded (it would look for libcuda.so).</summary>
    private static void RedirectIlgpuToDriver(CudaDriver driver)
    {
        try
        {
            NativeLibrary.SetDllImportResolver(typeof(ILGPU.Context).Assembly, (name, _, _) =>
                name.Contains("cuda", StringComparison.OrdinalIgnoreCase) && !name.Contains("cudart", StringComparison.OrdinalIgnoreCase)
                    ? driver.LibraryHandle : 0);
        }
        catch (InvalidOperationException)
        {
            // ILGPU registered its own resolver (WSL); it finds the driver itself.
        }
    }

    private float Time(Action launch)
    {
        for (int i = 0; i < 5; i++) launch();
        launcher.Synchronize();
        nint start = _driver.CreateEvent(), end = _driver.CreateEvent();
        try
        {
            var times = new List<float>(runs);
            for (int i = 0; i < runs; i++)
            {
                _driver.RecordEvent(start, 0);
                launch();
                _driver.RecordEvent(end, 0);
                times.Add(_driver.ElapsedMilliseconds(start, end));
            }
            times.Sort();
            return times[times.Count / 2];
        }
        finally
        {
            _driver.DestroyEvent(start);
            _driver.DestroyEvent(end);
        }
    }

    private static long CountMismatches(byte[] expected, byte[] actual, out long first)
    {
        first = -1;
        var e = MemoryMarshal.Cast<byte, ushort>(expected);
        var a = MemoryMarshal.Cast<byte, ushort>(actual);
        long count = 0;
        for (int i = 0; i < e.Length; i++)
            if (e[i] != a[i])
            {
                if (first < 0) first = i;
                count++;
            }
        return count;
    }
}
