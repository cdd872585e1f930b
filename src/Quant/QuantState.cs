namespace QLora.Quant;

/// <summary>
/// Everything needed to decode a 4-bit tensor, as bitsandbytes' <c>QuantState</c> holds it: the code table, blocksize,
/// original dtype and shape, and the per-block absmax — plain float32, or double-quantized (<see cref="Nested"/>).
/// </summary>
public sealed record QuantState
{
    /// <summary>NF4 or FP4.</summary>
    public required QuantType QuantType { get; init; }
    /// <summary>Elements per absmax block.</summary>
    public required int Blocksize { get; init; }
    /// <summary>The dtype of the weight before quantization; the default dequantization dtype.</summary>
    public required FloatType DType { get; init; }
    /// <summary>The original shape (e.g. [out, in] for a Linear weight).</summary>
    public required long[] Shape { get; init; }
    /// <summary>Plain float32 absmax per block; null when double-quantized.</summary>
    public float[]? Absmax { get; init; }
    /// <summary>Double quantization of the absmax; null when the absmax is plain.</summary>
    public NestedAbsmax? Nested { get; init; }

    /// <summary>Number of elements of the original tensor.</summary>
    public long Count => TensorShape.ElementCount(Shape);

    /// <summary>Number of absmax blocks: ceil(Count / Blocksize).</summary>
    public long BlockCount => (Count + Blocksize - 1) / Blocksize;

    /// <summary>Bytes of packed codes: ceil(Count / 2).</summary>
    public long PackedBytes => (Count + 1) / 2;

    /// <summary>The float32 absmax of every block, decoded if double-quantized.</summary>
    public float[] DecodeAbsmax()
    {
        if (Nested is { } nested) return nested.Decode();
        return Absmax ?? throw new InvalidOperationException("quant state has neither absmax nor nested absmax");
    }

    /// <summary>Checks the parts agree with each other; throws <see cref="FormatException"/> naming the mismatch.</summary>
    public void Validate()
    {
        QuantTypes.ValidateBlocksize(Blocksize);
        foreach (var d in Shape)
            if (d < 0) throw new FormatException($"quant state shape [{string.Join(", ", Shape)}] has a negative dimension");
        long blocks = BlockCount;
        if (Nested is { } nested)
        {
            if (nested.Codes.LongLength != blocks)
                throw new FormatException($"double-quantized absmax has {nested.Codes.LongLength} codes, expected {blocks} for {Count} elements at blocksize {Blocksize}");
            nested.Validate();
        }
        else if (Absmax is { } absmax)
        {
            if (absmax.LongLength != blocks)
                throw new FormatException($"absmax has {absmax.LongLength} values, expected {blocks} for {Count} elements at blocksize {Blocksize}");
        }
        else throw new FormatException("quant state has neither absmax nor nested absmax");
    }
}
