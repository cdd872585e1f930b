using QLora.Quant;

namespace QLora.Kernels;

/// <summary>The CPU implementation of <see cref="IFourBitDequantizer"/>: src/Quant's vectorised, multi-threaded dequantizer.</summary>
public sealed class CpuFourBitDequantizer : IFourBitDequantizer
{
    /// <summary>The shared instance (stateless).</summary>
    public static CpuFourBitDequantizer Instance { get; } = new();

    /// <inheritdoc />
    public DeviceKind Device => DeviceKind.Cpu;

    /// <inheritdoc />
    public void Dequantize(in FourBitPointers source, FloatType outputType, nint destination) =>
        FourBitDequantizer.Dequantize(source, outputType, destination);
}
