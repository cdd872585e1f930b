namespace QLora.Quant;

/// <summary>
/// A double-quantized absmax (bnb <c>compress_statistics</c>): 8-bit codes of <c>absmax − offset</c> in blocks of
/// <see cref="Blocksize"/> (256), each with its own float32 absmax, decoded through <see cref="Map"/>.
/// </summary>
public sealed record NestedAbsmax
{
    /// <summary>One 8-bit code per first-level block.</summary>
    public required byte[] Codes { get; init; }
    /// <summary>float32 absmax of each nested block.</summary>
    public required float[] Absmax { get; init; }
    /// <summary>The mean of the original absmax, added back after decoding.</summary>
    public required float Offset { get; init; }
    /// <summary>The 256-entry code table used (the file's own, for readers).</summary>
    public required float[] Map { get; init; }
    /// <summary>Codes per nested block (256 in every bitsandbytes checkpoint).</summary>
    public int Blocksize { get; init; } = 256;

    /// <summary>Decodes every absmax with two float32 roundings, no fused multiply-add: (map[q]·absmax2) then + offset.</summary>
    public float[] Decode()
    {
        var result = new float[Codes.Length];
        Decode(0, result);
        return result;
    }

    /// <summary>Decodes the absmax of blocks [start, start + destination.Length).</summary>
    public void Decode(long start, Span<float> destination)
    {
        var map = Map;
        for (int i = 0; i < destination.Length; i++)
        {
            long b = start + i;
            float a = map[Codes[b]] * Absmax[b / Blocksize]; // .NET never contracts this into an FMA
            destination[i] = a + Offset;
        }
    }

    /// <summary>Checks sizes agree; throws <see cref="FormatException"/> naming the mismatch.</summary>
    public void Validate()
    {
        if (Map.Length != 256) throw new FormatException($"nested quant map has {Map.Length} entries, expected 256");
        if (Blocksize <= 0) throw new FormatException($"nested blocksize {Blocksize} must be positive");
        long expected = (Codes.LongLength + Blocksize - 1) / Blocksize;
        if (Absmax.LongLength != expected)
            throw new FormatException($"nested absmax has {Absmax.LongLength} values, expected {expected} for {Codes.LongLength} codes at nested blocksize {Blocksize}");
    }
}
