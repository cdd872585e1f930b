namespace QLora.Quant;

/// <summary>
/// Where a 4-bit tensor's parts live, as raw addresses in one memory space (host memory for the CPU dequantizer, device
/// memory for a GPU kernel). Lets torch-owned or memory-mapped buffers be decoded without copies.
/// </summary>
public readonly record struct FourBitPointers
{
    /// <summary>ceil(Count/2) bytes of packed codes.</summary>
    public required nint Packed { get; init; }
    /// <summary>Number of elements.</summary>
    public required long Count { get; init; }
    /// <summary>Elements per absmax block.</summary>
    public required int Blocksize { get; init; }
    /// <summary>NF4 or FP4.</summary>
    public required QuantType QuantType { get; init; }
    /// <summary>float32 absmax per block when not double-quantized; otherwise 0.</summary>
    public nint Absmax { get; init; }
    /// <summary>8-bit absmax codes per block when double-quantized; otherwise 0.</summary>
    public nint AbsmaxCodes { get; init; }
    /// <summary>float32 absmax per nested block (double quantization).</summary>
    public nint NestedAbsmax { get; init; }
    /// <summary>The 256 float32 entries of the nested map (double quantization).</summary>
    public nint NestedMap { get; init; }
    /// <summary>The offset added after decoding a nested absmax.</summary>
    public float Offset { get; init; }
    /// <summary>Absmax codes per nested block (256).</summary>
    public int NestedBlocksize { get; init; }

    /// <summary>True when the absmax is double-quantized.</summary>
    public bool IsDoubleQuantized => AbsmaxCodes != 0;

    /// <summary>Number of absmax blocks.</summary>
    public long BlockCount => (Count + Blocksize - 1) / Blocksize;
}
