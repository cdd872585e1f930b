namespace QLora.Quant.Gguf;

/// <summary>Constants of the GGUF container (ggml's docs/gguf.md), shared by <see cref="GgufWriter"/> and <see cref="GgufReader"/>.</summary>
public static class GgufFormat
{
    /// <summary>"GGUF" as a little-endian uint32.</summary>
    public const uint Magic = 0x46554747;

    /// <summary>The format version written (3: 64-bit counts and lengths).</summary>
    public const uint Version = 3;

    /// <summary>Alignment of the data section and of every tensor in it, when <c>general.alignment</c> is absent.</summary>
    public const int DefaultAlignment = 32;

    /// <summary>The metadata key that overrides the alignment.</summary>
    public const string AlignmentKey = "general.alignment";

    /// <summary>Most dimensions a ggml tensor has.</summary>
    public const int MaxDimensions = 4;

    /// <summary>Rounds <paramref name="offset"/> up to a multiple of <paramref name="alignment"/>.</summary>
    public static long Align(long offset, int alignment) => (offset + alignment - 1) / alignment * alignment;
}
