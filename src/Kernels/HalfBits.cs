using ILGPU;

namespace QLora.Kernels;

/// <summary>
/// float32 → 16-bit roundings with integer arithmetic only, so kernels produce the same bits on every backend
/// (ILGPU has no bfloat16 type, and its Half conversion differs per backend). Both round to nearest even and match
/// <see cref="QLora.Quant.BFloat16.FromFloat"/> and .NET's <c>(Half)float</c> exactly, NaNs included.
/// </summary>
/// <remarks>
/// Kernels use the <c>…Bits</c> forms, which return the 16 bits zero-extended in a <see cref="uint"/>: ILGPU 1.5.3's
/// PTX backend widens a <see cref="ushort"/> result with a sign extension (<c>cvt.s32.s16</c>), which would smear
/// the sign bit of a negative bf16/fp16 over the upper half of a packed word. (Its CPU accelerator does not show this.)
/// </remarks>
public static class HalfBits
{
    /// <summary>bfloat16 bits of <paramref name="value"/>: round to nearest even, every NaN becomes 0x7FC0 (PyTorch).</summary>
    public static ushort BFloat16(float value) => (ushort)BFloat16Bits(value);

    /// <summary><see cref="BFloat16"/> as a zero-extended <see cref="uint"/> (for kernels).</summary>
    public static uint BFloat16Bits(float value)
    {
        uint bits = Interop.FloatAsInt(value);
        uint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
        return (bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded; // a select, not a branch, in PTX
    }

    /// <summary>IEEE binary16 bits of <paramref name="value"/>, round to nearest even; a NaN keeps its sign and top payload bits, quieted (as .NET).</summary>
    public static ushort Float16(float value) => (ushort)Float16Bits(value);

    /// <summary><see cref="Float16"/> as a zero-extended <see cref="uint"/> (for kernels).</summary>
    public static uint Float16Bits(float value)
    {
        uint bits = Interop.FloatAsInt(value);
        uint sign = (bits >> 16) & 0x8000u;
        uint ax = bits & 0x7FFFFFFFu;
        if (ax >= 0x7F800000u)
            return ax == 0x7F800000u ? sign | 0x7C00u : sign | 0x7E00u | ((ax & 0x7FFFFFu) >> 13);
        if (ax >= 0x477FF000u) return sign | 0x7C00u; // ≥ 65520 rounds to infinity
        if (ax >= 0x38800000u) // a normal half: rebias the exponent, round the 13 dropped bits to nearest even
            return sign | ((ax - 0x38000000u + 0xFFFu + ((ax >> 13) & 1u)) >> 13);
        uint e = ax >> 23;
        if (e < 102) return sign; // below 2^-25 (or exactly half of the smallest subnormal: ties to zero)
        uint m = (ax & 0x7FFFFFu) | 0x800000u;
        int shift = (int)(126 - e);
        uint q = m >> shift;
        uint rem = m & ((1u << shift) - 1u);
        uint half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u) != 0)) q++;
        return sign | q;
    }
}
