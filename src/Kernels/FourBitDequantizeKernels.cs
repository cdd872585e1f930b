using ILGPU;

namespace QLora.Kernels;

/// <summary>
/// The 4-bit → bf16 / fp16 / fp32 dequantization kernels, written once for every ILGPU backend (PTX on a GPU, the CPU
/// accelerator in tests). Each thread decodes one chunk of <see cref="ElementsPerThread"/> elements: one 16-byte load
/// of packed codes, one absmax (a chunk never straddles a block, since every blocksize is a multiple of 32), and
/// 16-byte stores. The partial last chunk falls back to byte loads and element stores.
/// Bit-identical to <see cref="QLora.Quant.FourBitReferenceDequantizer"/>: <c>(float)(table[code] · absmax)</c>, then
/// integer round-to-nearest-even; a double-quantized absmax is <c>(map[q] · absmax2)</c> then <c>+ offset</c>, two
/// roundings (the PTX build forbids contracting them into an FMA).
/// </summary>
/// <remarks>
/// Launch extent: <c>ceil(count / 32)</c> threads. The views of one buffer come in pairs (a <see cref="Packed16"/>
/// view for the vector path, an element view for the tail) over the same address, which must be 16-byte aligned.
/// </remarks>
public static class FourBitDequantizeKernels
{
    /// <summary>Elements one thread decodes: 16 packed bytes.</summary>
    public const int ElementsPerThread = 32;

    /// <summary>Plain float32 absmax → bfloat16.</summary>
    public static void DequantizeBf16(Index1D chunk, ArrayView<Packed16> packedVec, ArrayView<byte> packed,
        ArrayView<float> absmax, ArrayView<float> table, ArrayView<Packed16> outputVec, ArrayView<ushort> output,
        long count, int blocksize)
    {
        float scale = absmax[BlockOf(chunk, blocksize)];
        Write16(chunk, packedVec, packed, table, outputVec, output, count, scale, bf16: true);
    }

    /// <summary>Double-quantized absmax → bfloat16.</summary>
    public static void DequantizeNestedBf16(Index1D chunk, ArrayView<Packed16> packedVec, ArrayView<byte> packed,
        ArrayView<byte> absmaxCodes, ArrayView<float> nestedAbsmax, ArrayView<float> nestedMap, float offset,
        int nestedBlocksize, ArrayView<float> table, ArrayView<Packed16> outputVec, ArrayView<ushort> output,
        long count, int blocksize)
    {
        int block = BlockOf(chunk, blocksize);
        float scale = NestedScale(block, absmaxCodes, nestedAbsmax, nestedMap, offset, nestedBlocksize);
        Write16(chunk, packedVec, packed, table, outputVec, output, count, scale, bf16: true);
    }

    /// <summary>Plain float32 absmax → float16.</summary>
    public static void DequantizeF16(Index1D chunk, ArrayView<Packed16> packedVec, ArrayView<byte> packed,
        ArrayView<float> absmax, ArrayView<float> table, ArrayView<Packed16> outputVec, ArrayView<ushort> output,
        long count, int blocksize)
    {
        float scale = absmax[BlockOf(chunk, blocksize)];
        Write16(chunk, packedVec, packed, table, outputVec, output, count, scale, bf16: false);
    }

    /// <summary>Double-quantized absmax → float16.</summary>
    public static void DequantizeNestedF16(Index1D chunk, ArrayView<Packed16> packedVec, ArrayView<byte> packed,
        ArrayView<byte> absmaxCodes, ArrayView<float> nestedAbsmax, ArrayView<float> nestedMap, float offset,
        int nestedBlocksize, ArrayView<float> table, ArrayView<Packed16> outputVec, ArrayView<ushort> output,
        long count, int blocksize)
    {
        int block = BlockOf(chunk, blocksize);
        float scale = NestedScale(block, absmaxCodes, nestedAbsmax, nestedMap, offset, nestedBlocksize);
        Write16(chunk, packedVec, packed, table, outputVec, output, count, scale, bf16: false);
    }

    /// <summary>Plain float32 absmax → float32.</summary>
    public static void DequantizeF32(Index1D chunk, ArrayView<Packed16> packedVec, ArrayView<byte> packed,
        ArrayView<float> absmax, ArrayView<float> table, ArrayView<Packed16> outputVec, ArrayView<float> output,
        long count, int blocksize)
    {
        float scale = absmax[BlockOf(chunk, blocksize)];
        Write32(chunk, packedVec, packed, table, outputVec, output, count, scale);
    }

    /// <summary>Double-quantized absmax → float32.</summary>
    public static void DequantizeNestedF32(Index1D chunk, ArrayView<Packed16> packedVec, ArrayView<byte> packed,
        ArrayView<byte> absmaxCodes, ArrayView<float> nestedAbsmax, ArrayView<float> nestedMap, float offset,
        int nestedBlocksize, ArrayView<float> table, ArrayView<Packed16> outputVec, ArrayView<float> output,
        long count, int blocksize)
    {
        int block = BlockOf(chunk, blocksize);
        float scale = NestedScale(block, absmaxCodes, nestedAbsmax, nestedMap, offset, nestedBlocksize);
        Write32(chunk, packedVec, packed, table, outputVec, output, count, scale);
    }

    /// <summary>The absmax block of a chunk: a shift, since blocksizes are powers of two from 32 up (checked by the host).</summary>
    private static int BlockOf(Index1D chunk, int blocksize) =>
        chunk.X >> (IntrinsicMath.BitOperations.TrailingZeroCount(blocksize) - 5);

    private static float NestedScale(int block, ArrayView<byte> codes, ArrayView<float> nestedAbsmax,
        ArrayView<float> map, float offset, int nestedBlocksize)
    {
        float a = map[(int)codes[block]] * nestedAbsmax[block / nestedBlocksize];
        return a + offset;
    }

    private static uint Round16(float value, bool bf16) => bf16 ? HalfBits.BFloat16Bits(value) : HalfBits.Float16Bits(value);

    /// <summary>Two elements of one packed byte as a little-endian word: the even element (high nibble) in the low half.</summary>
    private static uint Pair16(uint b, ArrayView<float> table, float scale, bool bf16)
    {
        uint even = Round16(table[(int)((b >> 4) & 0xF)] * scale, bf16);
        uint odd = Round16(table[(int)(b & 0xF)] * scale, bf16);
        return even | (odd << 16);
    }

    private static Packed16 Word16(uint w, ArrayView<float> table, float scale, bool bf16) => new(
        Pair16(w & 0xFF, table, scale, bf16), Pair16((w >> 8) & 0xFF, table, scale, bf16),
        Pair16((w >> 16) & 0xFF, table, scale, bf16), Pair16(w >> 24, table, scale, bf16));

    private static void Write16(Index1D chunk, ArrayView<Packed16> packedVec, ArrayView<byte> packed,
        ArrayView<float> table, ArrayView<Packed16> outputVec, ArrayView<ushort> output, long count, float scale, bool bf16)
    {
        long first = (long)chunk.X * ElementsPerThread;
        if (first + ElementsPerThread <= count)
        {
            Packed16 p = packedVec[chunk.X];
            long o = (long)chunk.X * 4;
            outputVec[o] = Word16(p.X, table, scale, bf16);
            outputVec[o + 1] = Word16(p.Y, table, scale, bf16);
            outputVec[o + 2] = Word16(p.Z, table, scale, bf16);
            outputVec[o + 3] = Word16(p.W, table, scale, bf16);
            return;
        }
        for (long e = first; e < count; e++)
        {
            uint b = packed[e >> 1];
            uint code = (e & 1) == 0 ? b >> 4 : b & 0xF;
            output[e] = (ushort)Round16(table[(int)code] * scale, bf16);
        }
    }

    private static Packed16 Quad32(uint w, ArrayView<float> table, float scale) => new(
        Interop.FloatAsInt(table[(int)((w >> 4) & 0xF)] * scale), Interop.FloatAsInt(table[(int)(w & 0xF)] * scale),
        Interop.FloatAsInt(table[(int)((w >> 12) & 0xF)] * scale), Interop.FloatAsInt(table[(int)((w >> 8) & 0xF)] * scale));

    private static void Write32(Index1D chunk, ArrayView<Packed16> packedVec, ArrayView<byte> packed,
        ArrayView<float> table, ArrayView<Packed16> outputVec, ArrayView<float> output, long count, float scale)
    {
        long first = (long)chunk.X * ElementsPerThread;
        if (first + ElementsPerThread <= count)
        {
            Packed16 p = packedVec[chunk.X];
            long o = (long)chunk.X * 8;
            outputVec[o] = Quad32(p.X, table, scale);
            outputVec[o + 1] = Quad32(p.X >> 16, table, scale);
            outputVec[o + 2] = Quad32(p.Y, table, scale);
            outputVec[o + 3] = Quad32(p.Y >> 16, table, scale);
            outputVec[o + 4] = Quad32(p.Z, table, scale);
            outputVec[o + 5] = Quad32(p.Z >> 16, table, scale);
            outputVec[o + 6] = Quad32(p.W, table, scale);
            outputVec[o + 7] = Quad32(p.W >> 16, table, scale);
            return;
        }
        for (long e = first; e < count; e++)
        {
            uint b = packed[e >> 1];
            uint code = (e & 1) == 0 ? b >> 4 : b & 0xF;
            output[e] = table[(int)code] * scale;
        }
    }
}
