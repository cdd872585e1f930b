using QLora.Quant;

namespace QLora.Kernels;

/// <summary>
/// Launches <see cref="AdamW8bitKernel"/> on device memory of the primary context (the paged 8-bit optimizer's GPU
/// path): one launch per parameter tensor, on the default stream, without waiting.
/// </summary>
public sealed class CudaAdamW8bit
{
    /// <summary>Creates an updater that launches through <paramref name="launcher"/>.</summary>
    public CudaAdamW8bit(CudaKernelLauncher launcher) => Launcher = launcher;

    /// <summary>The launcher (device, primary context, loaded kernels).</summary>
    public CudaKernelLauncher Launcher { get; }

    /// <summary>
    /// One AdamW step over <paramref name="count"/> parameters at device address <paramref name="param"/>, with
    /// gradients of the same <paramref name="parameterType"/> (float32 or bfloat16), 8-bit states (one byte per element)
    /// and float32 absmax per 256 elements, all updated in place.
    /// </summary>
    public void Update(nint param, nint grad, nint state1, nint state2, nint absmax1, nint absmax2, long count, in AdamW8bitStep step,
        FloatType parameterType = FloatType.Float32)
    {
        if (count <= 0) return;
        if (param == 0 || grad == 0 || state1 == 0 || state2 == 0 || absmax1 == 0 || absmax2 == 0)
            throw new ArgumentException("null device address");
        using var args = BuildArguments(param, grad, state1, state2, absmax1, absmax2, count, step,
            Launcher.Table("dynamic-signed", DynamicMap.Signed), Launcher.Table("dynamic-unsigned", DynamicMap.Unsigned));
        Launcher.Launch(KernelName(parameterType), Extent(count), args);
    }

    /// <summary>The kernel for a parameter type; float16 parameters are not supported.</summary>
    public static string KernelName(FloatType parameterType) => parameterType switch
    {
        FloatType.Float32 => nameof(AdamW8bitKernel.AdamW8bitUpdate),
        FloatType.BFloat16 => nameof(AdamW8bitKernel.AdamW8bitUpdateBf16),
        _ => throw new NotSupportedException($"8-bit AdamW supports float32 and bfloat16 parameters, not {parameterType.Name()}"),
    };

    /// <summary>Threads launched for <paramref name="count"/> elements: one per 256-element block.</summary>
    public static int Extent(long count) => checked((int)((count + AdamW8bitStep.Blocksize - 1) / AdamW8bitStep.Blocksize));

    /// <summary>The kernel's argument list, in its parameter order.</summary>
    public static KernelArguments BuildArguments(nint param, nint grad, nint state1, nint state2, nint absmax1, nint absmax2,
        long count, in AdamW8bitStep step, ulong signedMap, ulong unsignedMap)
    {
        long blocks = Extent(count);
        var args = new KernelArguments(20);
        args.Scalar(Extent(count))
            .View((ulong)param, count).View((ulong)grad, count)
            .View((ulong)state1, count).View((ulong)state2, count)
            .View((ulong)absmax1, blocks).View((ulong)absmax2, blocks)
            .View(signedMap, 256).View(unsignedMap, 256)
            .Scalar(count)
            .Scalar(step.Beta1).Scalar(step.Beta2).Scalar(step.OneMinusBeta1).Scalar(step.OneMinusBeta2)
            .Scalar(step.StepSize).Scalar(step.EpsilonTerm).Scalar(step.DecayFactor);
        return args;
    }
}
