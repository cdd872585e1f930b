using QLora.Quant;

namespace QLora.Kernels;

/// <summary>Where a dequantizer's buffers live.</summary>
public enum DeviceKind
{
    /// <summary>Host memory, decoded by vectorised C#.</summary>
    Cpu,
    /// <summary>CUDA device memory in the primary context (libtorch's), decoded by ILGPU-compiled kernels.</summary>
    Cuda,
}

/// <summary>
/// The one dequantization contract <c>Linear4bit</c> uses: decode a 4-bit weight whose parts live at
/// <see cref="FourBitPointers"/> into a destination buffer in the same memory space, bit-identical to
/// <see cref="FourBitReferenceDequantizer"/>.
/// </summary>
public interface IFourBitDequantizer
{
    /// <summary>The memory space of every pointer passed in.</summary>
    DeviceKind Device { get; }

    /// <summary>Writes Count elements of <paramref name="outputType"/> to <paramref name="destination"/>.</summary>
    void Dequantize(in FourBitPointers source, FloatType outputType, nint destination);
}
