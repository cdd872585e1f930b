using QLora.Quant;

namespace QLora.Kernels;

/// <summary>
/// The CUDA implementation of <see cref="IFourBitDequantizer"/>: every pointer (packed codes, absmax parts,
/// destination) is device memory of the primary context — typically torch tensors' data pointers. One launch decodes
/// the whole weight on the legacy default stream; the call returns without waiting (torch work queued after it on the
/// default stream sees the result). Packed codes and destination must be 16-byte aligned (torch allocations are).
/// </summary>
public sealed class CudaFourBitDequantizer : IFourBitDequantizer
{
    private const int MaxArguments = 16;

    /// <summary>Creates a dequantizer that launches through <paramref name="launcher"/>.</summary>
    public CudaFourBitDequantizer(CudaKernelLauncher launcher) => Launcher = launcher;

    /// <summary>The launcher (device, primary context, loaded kernels).</summary>
    public CudaKernelLauncher Launcher { get; }

    /// <inheritdoc />
    public DeviceKind Device => DeviceKind.Cuda;

    /// <summary>The kernel method that handles a source of this kind and output type.</summary>
    public static string KernelName(bool doubleQuantized, FloatType outputType) =>
        "Dequantize" + (doubleQuantized ? "Nested" : "") + outputType switch
        {
            FloatType.BFloat16 => "Bf16",
            FloatType.Float16 => "F16",
            _ => "F32",
        };

    /// <inheritdoc />
    public void Dequantize(in FourBitPointers source, FloatType outputType, nint destination)
    {
        Validate(source, destination);
        if (source.Count == 0) return;
        using var args = BuildArguments(source, outputType, destination, Launcher.CodeTable(source.QuantType));
        Launcher.Launch(KernelName(source.IsDoubleQuantized, outputType), Extent(source.Count), args);
    }

    /// <summary>Threads launched for <paramref name="count"/> elements.</summary>
    public static int Extent(long count) =>
        checked((int)((count + FourBitDequantizeKernels.ElementsPerThread - 1) / FourBitDequantizeKernels.ElementsPerThread));

    /// <summary>Checks sizes and addresses; throws <see cref="ArgumentException"/> naming the problem.</summary>
    public static void Validate(in FourBitPointers source, nint destination)
    {
        QuantTypes.ValidateBlocksize(source.Blocksize);
        if (source.Count < 0) throw new ArgumentOutOfRangeException(nameof(source), "negative element count");
        if (source.Count == 0) return;
        if (source.Packed == 0 || destination == 0 || (source.Absmax == 0 && source.AbsmaxCodes == 0))
            throw new ArgumentException("null device address (packed, absmax or destination)", nameof(source));
        if (source.IsDoubleQuantized && (source.NestedAbsmax == 0 || source.NestedMap == 0 || source.NestedBlocksize <= 0))
            throw new ArgumentException("double-quantized source without nested absmax, map or blocksize", nameof(source));
        if ((source.Packed & 15) != 0 || (destination & 15) != 0)
            throw new ArgumentException("packed codes and destination must be 16-byte aligned device addresses (pass whole, contiguous tensors)", nameof(source));
        if (source.Count > (long)int.MaxValue * FourBitDequantizeKernels.ElementsPerThread)
            throw new ArgumentOutOfRangeException(nameof(source), "more elements than one launch covers");
    }

    /// <summary>The argument list of the kernel <see cref="KernelName"/> picks, in its parameter order.</summary>
    public static KernelArguments BuildArguments(in FourBitPointers s, FloatType outputType, nint destination, ulong table)
    {
        long packedBytes = (s.Count + 1) / 2;
        long outBytes = s.Count * outputType.Size();
        var args = new KernelArguments(MaxArguments);
        args.Scalar(Extent(s.Count))
            .View((ulong)s.Packed, packedBytes / 16)
            .View((ulong)s.Packed, packedBytes);
        if (s.IsDoubleQuantized)
            args.View((ulong)s.AbsmaxCodes, s.BlockCount)
                .View((ulong)s.NestedAbsmax, (s.BlockCount + s.NestedBlocksize - 1) / s.NestedBlocksize)
                .View((ulong)s.NestedMap, 256)
                .Scalar(s.Offset)
                .Scalar(s.NestedBlocksize);
        else
            args.View((ulong)s.Absmax, s.BlockCount);
        args.View(table, 16)
            .View((ulong)destination, outBytes / 16)
            .View((ulong)destination, s.Count)
            .Scalar(s.Count)
            .Scalar(s.Blocksize);
        return args;
    }
}
