namespace QLora.Kernels;

/// <summary>Picks the <see cref="IFourBitDequantizer"/> for a device: the vectorised CPU one, or the CUDA kernels in the primary context.</summary>
public static class FourBitDequantizers
{
    /// <summary>
    /// The dequantizer for <paramref name="device"/> (CUDA: device <paramref name="ordinal"/>). Throws
    /// <see cref="CudaUnavailableException"/>, saying what is missing and what to do, when CUDA is asked for and the
    /// driver or device is not there.
    /// </summary>
    public static IFourBitDequantizer Create(DeviceKind device, int ordinal = 0) => device switch
    {
        DeviceKind.Cpu => CpuFourBitDequantizer.Instance,
        DeviceKind.Cuda => new CudaFourBitDequantizer(CudaKernelLauncher.ForDevice(ordinal)),
        _ => throw new ArgumentOutOfRangeException(nameof(device), device, "unknown device kind"),
    };
}
