namespace QLora.Quant;

/// <summary>A 4-bit tensor: packed codes (two per byte, even element in the high nibble) and how to decode them.</summary>
public sealed class QuantizedTensor
{
    /// <summary>Wraps packed codes and their state, checking that their sizes agree.</summary>
    public QuantizedTensor(byte[] packed, QuantState state)
    {
        state.Validate();
        if (packed.LongLength != state.PackedBytes)
            throw new FormatException($"packed weight has {packed.LongLength} bytes, expected {state.PackedBytes} for shape [{string.Join(", ", state.Shape)}]");
        Packed = packed;
        State = state;
    }

    /// <summary>ceil(n/2) bytes of codes.</summary>
    public byte[] Packed { get; }

    /// <summary>How to decode <see cref="Packed"/>.</summary>
    public QuantState State { get; }

    /// <summary>Number of elements.</summary>
    public long Count => State.Count;

    /// <summary>Bytes stored: packed codes, absmax (codes or float32) and, with double quantization, the nested absmax and map.</summary>
    public long StorageBytes
    {
        get
        {
            long bytes = Packed.LongLength + 16 * 4;
            if (State.Nested is { } nested) bytes += nested.Codes.LongLength + nested.Absmax.LongLength * 4 + nested.Map.Length * 4 + 4;
            else bytes += State.Absmax!.LongLength * 4;
            return bytes;
        }
    }
}
