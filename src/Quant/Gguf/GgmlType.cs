namespace QLora.Quant.Gguf;

/// <summary>
/// ggml's tensor types that this project writes, with ggml's numeric ids (the values stored in a GGUF tensor info).
/// Quantized types store fixed-size blocks of consecutive elements along a row.
/// </summary>
public enum GgmlType : uint
{
    /// <summary>float32.</summary>
    F32 = 0,
    /// <summary>IEEE float16.</summary>
    F16 = 1,
    /// <summary>32 weights: an fp16 scale and 4-bit codes (value = (q − 8)·d).</summary>
    Q4_0 = 2,
    /// <summary>32 weights: an fp16 scale and 5-bit codes (value = (q − 16)·d).</summary>
    Q5_0 = 6,
    /// <summary>32 weights: an fp16 scale and int8 codes.</summary>
    Q8_0 = 8,
    /// <summary>256 weights in 8 sub-blocks of 32: 4-bit codes, 6-bit sub-block scales and mins, fp16 super-block scale and min.</summary>
    Q4_K = 12,
    /// <summary>256 weights in 8 sub-blocks of 32: 5-bit codes, 6-bit sub-block scales and mins, fp16 super-block scale and min.</summary>
    Q5_K = 13,
    /// <summary>256 weights in 16 sub-blocks of 16: 6-bit codes, int8 sub-block scales, an fp16 super-block scale.</summary>
    Q6_K = 14,
    /// <summary>bfloat16.</summary>
    BF16 = 30,
}

/// <summary>Block sizes and byte sizes of <see cref="GgmlType"/>s, as ggml's type traits define them.</summary>
public static class GgmlTypes
{
    /// <summary>Elements per block (1 for plain float types).</summary>
    public static int BlockSize(this GgmlType type) => type switch
    {
        GgmlType.F32 or GgmlType.F16 or GgmlType.BF16 => 1,
        GgmlType.Q4_0 or GgmlType.Q5_0 or GgmlType.Q8_0 => 32,
        GgmlType.Q4_K or GgmlType.Q5_K or GgmlType.Q6_K => 256,
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "unknown ggml type"),
    };

    /// <summary>Bytes per block.</summary>
    public static int BlockBytes(this GgmlType type) => type switch
    {
        GgmlType.F32 => 4,
        GgmlType.F16 or GgmlType.BF16 => 2,
        GgmlType.Q4_0 => 18,
        GgmlType.Q5_0 => 22,
        GgmlType.Q8_0 => 34,
        GgmlType.Q4_K => 144,
        GgmlType.Q5_K => 176,
        GgmlType.Q6_K => 210,
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "unknown ggml type"),
    };

    /// <summary>True for the block-quantized types.</summary>
    public static bool IsQuantized(this GgmlType type) => type.BlockSize() > 1;

    /// <summary>Bytes of a row of <paramref name="columns"/> elements; the row must hold whole blocks.</summary>
    public static long RowBytes(this GgmlType type, long columns)
    {
        int block = type.BlockSize();
        if (columns % block != 0) throw new ArgumentException($"a row of {columns} elements is not a whole number of {type.Name()} blocks ({block})", nameof(columns));
        return columns / block * type.BlockBytes();
    }

    /// <summary>ggml's lower-case name (f16, q4_K, ...), as llama.cpp prints it.</summary>
    public static string Name(this GgmlType type) => type switch
    {
        GgmlType.F32 => "f32",
        GgmlType.F16 => "f16",
        GgmlType.BF16 => "bf16",
        GgmlType.Q4_0 => "q4_0",
        GgmlType.Q5_0 => "q5_0",
        GgmlType.Q8_0 => "q8_0",
        GgmlType.Q4_K => "q4_K",
        GgmlType.Q5_K => "q5_K",
        GgmlType.Q6_K => "q6_K",
        _ => type.ToString(),
    };

    /// <summary>Whether <paramref name="id"/> is a type this project can read back.</summary>
    public static bool IsKnown(uint id) => Enum.IsDefined((GgmlType)id);
}
