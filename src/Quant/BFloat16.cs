namespace QLora.Quant;

/// <summary>bfloat16 bit conversions matching PyTorch: round to nearest even, every NaN becomes 0x7FC0.</summary>
public static class BFloat16
{
    /// <summary>The canonical NaN PyTorch produces when rounding a NaN float32 to bfloat16.</summary>
    public const ushort NaN = 0x7FC0;

    /// <summary>Rounds a float32 to the nearest bfloat16 (ties to even).</summary>
    public static ushort FromFloat(float value)
    {
        if (float.IsNaN(value)) return NaN;
        uint bits = BitConverter.SingleToUInt32Bits(value);
        uint bias = 0x7FFFu + ((bits >> 16) & 1u);
        return (ushort)((bits + bias) >> 16);
    }

    /// <summary>Widens a bfloat16 to float32 exactly.</summary>
    public static float ToFloat(ushort bits) => BitConverter.UInt32BitsToSingle((uint)bits << 16);
}
