using ILGPU;
using ILGPU.Runtime;
using QLora.Quant;

namespace QLora.Kernels;

/// <summary>
/// Runs this project's kernels through a stock ILGPU <see cref="Accelerator"/> on host arrays, with the same argument
/// lists the CUDA launcher builds. Meant for ILGPU's CPU accelerator: the bit-exactness tests and the GPU check's
/// CPU-only mode (about a million elements per second, so small inputs only). Never use a stock CUDA accelerator on
/// torch memory: it runs in a private context (see docs).
/// </summary>
public sealed class AcceleratorKernelRunner(Accelerator accelerator)
{
    /// <summary>The accelerator kernels run on.</summary>
    public Accelerator Accelerator { get; } = accelerator;

    /// <summary>Dequantizes <paramref name="tensor"/> into <paramref name="destination"/> with the kernel the CUDA path would use.</summary>
    public void Dequantize(QuantizedTensor tensor, FloatType outputType, Span<byte> destination)
    {
        var s = tensor.State;
        long n = s.Count;
        if (destination.Length < n * outputType.Size()) throw new ArgumentException("destination too small", nameof(destination));
        if (n == 0) return;
        var acc = Accelerator;
        using var packed = acc.Allocate1D(tensor.Packed);
        using var table = acc.Allocate1D(s.QuantType.Table().ToArray());
        using var output = acc.Allocate1D<byte>(n * outputType.Size());
        var buffers = new List<IDisposable>();
        try
        {
            var args = new List<object> { packed.View.BaseView.Cast<Packed16>(), packed.View.BaseView };
            if (s.Nested is { } nested)
            {
                var codes = acc.Allocate1D(nested.Codes);
                var absmax2 = acc.Allocate1D(nested.Absmax);
                var map = acc.Allocate1D(nested.Map);
                buffers.AddRange([codes, absmax2, map]);
                args.AddRange([codes.View.BaseView, absmax2.View.BaseView, map.View.BaseView, nested.Offset, nested.Blocksize]);
            }
            else
            {
                var absmax = acc.Allocate1D(s.Absmax!);
                buffers.Add(absmax);
                args.Add(absmax.View.BaseView);
            }
            args.Add(table.View.BaseView);
            args.Add(output.View.BaseView.Cast<Packed16>());
            args.Add(outputType == FloatType.Float32 ? output.View.BaseView.Cast<float>() : output.View.BaseView.Cast<ushort>());
            args.Add(n);
            args.Add(s.Blocksize);
            string name = CudaFourBitDequantizer.KernelName(s.Nested != null, outputType);
            Launch(name, CudaFourBitDequantizer.Extent(n), args);
            output.View.BaseView.CopyToCPU(destination[..(int)(n * outputType.Size())]);
        }
        finally
        {
            foreach (var b in buffers) b.Dispose();
        }
    }

    /// <summary>Runs one float32 <see cref="AdamW8bitKernel"/> step on host arrays (updated in place).</summary>
    public void AdamW8bitUpdate(float[] param, float[] grad, byte[] state1, byte[] state2, float[] absmax1, float[] absmax2, in AdamW8bitStep step) =>
        AdamW8bitUpdate<float>(param, grad, state1, state2, absmax1, absmax2, step, nameof(AdamW8bitKernel.AdamW8bitUpdate));

    /// <summary>Runs one bfloat16 <see cref="AdamW8bitKernel"/> step on host arrays (raw bf16 bits, updated in place).</summary>
    public void AdamW8bitUpdate(ushort[] param, ushort[] grad, byte[] state1, byte[] state2, float[] absmax1, float[] absmax2, in AdamW8bitStep step) =>
        AdamW8bitUpdate<ushort>(param, grad, state1, state2, absmax1, absmax2, step, nameof(AdamW8bitKernel.AdamW8bitUpdateBf16));

    private void AdamW8bitUpdate<T>(T[] param, T[] grad, byte[] state1, byte[] state2, float[] absmax1, float[] absmax2,
        in AdamW8bitStep step, string kernel) where T : unmanaged
    {
        var acc = Accelerator;
        using var p = acc.Allocate1D(param);
        using var g = acc.Allocate1D(grad);
        using var s1 = acc.Allocate1D(state1);
        using var s2 = acc.Allocate1D(state2);
        using var a1 = acc.Allocate1D(absmax1);
        using var a2 = acc.Allocate1D(absmax2);
        using var signed = acc.Allocate1D(DynamicMap.Signed.ToArray());
        using var unsigned = acc.Allocate1D(DynamicMap.Unsigned.ToArray());
        Launch(kernel, CudaAdamW8bit.Extent(param.Length),
        [
            p.View.BaseView, g.View.BaseView, s1.View.BaseView, s2.View.BaseView, a1.View.BaseView, a2.View.BaseView,
            signed.View.BaseView, unsigned.View.BaseView, (long)param.Length,
            step.Beta1, step.Beta2, step.OneMinusBeta1, step.OneMinusBeta2, step.StepSize, step.EpsilonTerm, step.DecayFactor,
        ]);
        p.View.BaseView.CopyToCPU(param);
        s1.View.BaseView.CopyToCPU(state1);
        s2.View.BaseView.CopyToCPU(state2);
        a1.View.BaseView.CopyToCPU(absmax1);
        a2.View.BaseView.CopyToCPU(absmax2);
    }

    private void Launch(string kernelName, int extent, List<object> args)
    {
        var kernel = Accelerator.LoadAutoGroupedKernel(KernelCatalog.Get(kernelName));
        kernel.Launch(Accelerator.DefaultStream, extent, args.ToArray());
        Accelerator.Synchronize();
    }
}
