using QLora.Quant;

namespace QLora.Kernels.Tests;

public class HalfBitsTests
{
    private static IEnumerable<uint> Patterns()
    {
        for (ulong b = 0; b <= uint.MaxValue; b += 4093) yield return (uint)b;
        uint[] specials =
        [
            0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF,
            0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x38800000, 0x387FFFFF, 0x387FF000, 0x33000000, 0x33000001,
            0x32FFFFFF, 0x33800000, 0x33C00000, 0x34000000, 0x3F800000, 0x3F801000, 0x3F803000, 0x3F808000, 0x3F818000,
        ];
        foreach (var s in specials)
        {
            yield return s;
            yield return s | 0x80000000;
        }
        // Every rounding boundary around the half subnormal/normal range.
        for (uint b = 0x33000000 - 4; b < 0x38900000; b += 0x400 - 1) yield return b;
    }

    [Fact]
    public void BFloat16MatchesQuantReference()
    {
        foreach (var bits in Patterns())
        {
            float f = BitConverter.UInt32BitsToSingle(bits);
            Assert.True(BFloat16.FromFloat(f) == HalfBits.BFloat16(f), $"bf16 of 0x{bits:X8}");
        }
    }

    [Fact]
    public void Float16MatchesDotNetHalf()
    {
        foreach (var bits in Patterns())
        {
            float f = BitConverter.UInt32BitsToSingle(bits);
            ushort expected = BitConverter.HalfToUInt16Bits((Half)f);
            ushort actual = HalfBits.Float16(f);
            Assert.True(expected == actual, $"fp16 of 0x{bits:X8}: expected 0x{expected:X4}, got 0x{actual:X4}");
        }
    }
}
