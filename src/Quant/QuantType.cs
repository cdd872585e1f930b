namespace QLora.Quant;

/// <summary>The 4-bit code tables bitsandbytes defines: NF4 (normal float, the QLoRA default) and FP4.</summary>
public enum QuantType
{
    /// <summary>4-bit NormalFloat: 16 values spaced as quantiles of a normal distribution, zero at code 7.</summary>
    Nf4,
    /// <summary>4-bit float (1 sign, 2 exponent, 1 mantissa bit), bitsandbytes' FP4 layout.</summary>
    Fp4,
}

/// <summary>Names and tables of <see cref="QuantType"/> as bitsandbytes spells them.</summary>
public static class QuantTypes
{
    /// <summary>The name used in quant-state JSON and key suffixes ("nf4" / "fp4").</summary>
    public static string Name(this QuantType type) => type == QuantType.Nf4 ? "nf4" : "fp4";

    /// <summary>Parses "nf4" or "fp4" (case-insensitive); throws <see cref="FormatException"/> otherwise.</summary>
    public static QuantType Parse(string name) => name.ToLowerInvariant() switch
    {
        "nf4" => QuantType.Nf4,
        "fp4" => QuantType.Fp4,
        _ => throw new FormatException($"unknown 4-bit quant type '{name}': expected nf4 or fp4"),
    };

    /// <summary>The 16 code values, indexed by code.</summary>
    public static ReadOnlySpan<float> Table(this QuantType type) => type == QuantType.Nf4 ? Nf4Codebook.Values : Fp4Codebook.Values;

    /// <summary>The code that decodes to exactly 0.0 (used for the padding nibble and all-zero blocks).</summary>
    public static byte ZeroCode(this QuantType type) => type == QuantType.Nf4 ? Nf4Codebook.ZeroCode : Fp4Codebook.ZeroCode;

    /// <summary>The code for a value already scaled into [-1, 1].</summary>
    public static byte Encode(this QuantType type, float scaled) => type == QuantType.Nf4 ? Nf4Codebook.Encode(scaled) : Fp4Codebook.Encode(scaled);

    /// <summary>Checks a blocksize is one bitsandbytes accepts: a power of two from 32 to 4096.</summary>
    public static void ValidateBlocksize(int blocksize)
    {
        if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(blocksize), blocksize, "blocksize must be a power of two from 32 to 4096");
    }
}
