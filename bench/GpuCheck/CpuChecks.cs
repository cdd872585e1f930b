using ILGPU;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using QLora.Kernels;
using QLora.Quant;

namespace QLora.GpuCheck;

/// <summary>What runs without a GPU: PTX compilation of every kernel, and the kernels on ILGPU's CPU accelerator against the references.</summary>
internal static class CpuChecks
{
    public static void Run(CheckReport report, int seed)
    {
        report.Run("ptx compile", () =>
        {
            long bytes = 0;
            foreach (var name in KernelCatalog.Names)
            {
                var k = PtxKernelCompiler.Shared.Compile(name, CudaArchitecture.SM_80, CudaInstructionSet.ISA_70);
                if (k.EntryName != "Kernel_" + name) throw new InvalidOperationException($"{name}: entry {k.EntryName}");
                bytes += k.Assembly.Length;
            }
            report.Add("ptx compile", Outcome.Pass, $"{KernelCatalog.Names.Count} kernels (Kernel_<method>), {bytes / 1024} KiB of PTX for sm_80 / ISA 7.0");
        });

        using var context = Context.Create(b => b.CPU().Math(MathMode.Default));
        using var accelerator = context.CreateCPUAccelerator(0);
        var runner = new AcceleratorKernelRunner(accelerator);

        report.Run("cpu accelerator dequant", () =>
        {
            var rng = new Random(seed);
            int n = 64 * 70 + 37;
            var x = Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray();
            int checkedElements = 0;
            foreach (var type in new[] { QuantType.Nf4, QuantType.Fp4 })
                foreach (var dq in new[] { false, true })
                {
                    var t = FourBitQuantizer.Quantize(x, [n], type, 64, dq);
                    foreach (var output in new[] { FloatType.BFloat16, FloatType.Float16, FloatType.Float32 })
                    {
                        var expected = new byte[n * output.Size()];
                        var actual = new byte[expected.Length];
                        FourBitReferenceDequantizer.Dequantize(t, output, expected);
                        runner.Dequantize(t, output, actual);
                        if (!expected.AsSpan().SequenceEqual(actual))
                            throw new InvalidOperationException($"{type} dq={dq} {output}: kernel differs from the reference");
                        checkedElements += n;
                    }
                }
            report.Add("cpu accelerator dequant", Outcome.Pass, $"{checkedElements} elements bit-identical (NF4/FP4, ±double quant, bf16/fp16/fp32)");
        });

        report.Run("cpu accelerator adamw8bit", () =>
        {
            int n = 1000;
            var rng = new Random(seed + 1);
            var p = Enumerable.Range(0, n).Select(_ => rng.NextSingle() - 0.5f).ToArray();
            var s1 = Enumerable.Repeat((byte)127, n).ToArray();
            var s2 = new byte[n];
            var a1 = new float[4];
            var a2 = new float[4];
            var (rp, rs1, rs2, ra1, ra2) = ((float[])p.Clone(), (byte[])s1.Clone(), (byte[])s2.Clone(), (float[])a1.Clone(), (float[])a2.Clone());
            for (int t = 1; t <= 3; t++)
            {
                var g = Enumerable.Range(0, n).Select(_ => (rng.NextSingle() - 0.5f) * 0.1f).ToArray();
                if (t == 2) g[7] = float.NaN;
                var step = AdamW8bitStep.Create(1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, t);
                AdamW8bitReference.Update(rp, g, rs1, rs2, ra1, ra2, step);
                runner.AdamW8bitUpdate(p, g, s1, s2, a1, a2, step);
            }
            bool same = rp.AsSpan().SequenceEqual(p) && rs1.AsSpan().SequenceEqual(s1) && rs2.AsSpan().SequenceEqual(s2)
                && ra1.AsSpan().SequenceEqual(a1) && ra2.AsSpan().SequenceEqual(a2);
            report.Add("cpu accelerator adamw8bit", same ? Outcome.Pass : Outcome.Fail, same ? $"{n} elements × 3 steps bit-identical to the reference" : "kernel differs from the reference");
        });
    }
}
