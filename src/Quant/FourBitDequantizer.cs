using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace QLora.Quant;

/// <summary>
/// The fast CPU 4-bit dequantizer: multi-threaded over chunks of blocks, SIMD table lookups (AVX-512 permutes, or SSSE3
/// byte shuffles), writing bf16/fp16/fp32 straight into a caller's buffer. Bit-identical to
/// <see cref="FourBitReferenceDequantizer"/>: each block's 16 possible outputs are computed once with the same float32
/// multiply and rounding, then looked up.
/// </summary>
public static unsafe class FourBitDequantizer
{
    /// <summary>Which instruction set a call may use; <see cref="Auto"/> picks the best the CPU has. Others are for tests.</summary>
    public enum Path
    {
        /// <summary>The best available.</summary>
        Auto,
        /// <summary>Plain C#, one element at a time through the per-block table.</summary>
        Scalar,
        /// <summary>128-bit byte shuffles (x86 SSSE3).</summary>
        Ssse3,
        /// <summary>512-bit word and dword permutes (AVX-512 BW).</summary>
        Avx512,
    }

    private const long ChunkElements = 1 << 16;
    // Below this, one thread: waking workers costs more than it saves, and inside a training step libtorch's own
    // OpenMP threads are still spinning on the same cores.
    internal const long ParallelThreshold = 1L << 23;

    /// <summary>Dequantizes a tensor into <paramref name="destination"/> (Count elements of <paramref name="outputType"/>).</summary>
    public static void Dequantize(QuantizedTensor tensor, FloatType outputType, Span<byte> destination, Path path = Path.Auto)
    {
        var s = tensor.State;
        if (destination.Length < s.Count * outputType.Size()) throw new ArgumentException("destination too small", nameof(destination));
        fixed (byte* packed = tensor.Packed)
        fixed (byte* dst = destination)
        {
            if (s.Nested is { } nested)
            {
                fixed (byte* codes = nested.Codes)
                fixed (float* absmax2 = nested.Absmax)
                fixed (float* map = nested.Map)
                {
                    Dequantize(new FourBitPointers
                    {
                        Packed = (nint)packed, Count = s.Count, Blocksize = s.Blocksize, QuantType = s.QuantType,
                        AbsmaxCodes = (nint)codes, NestedAbsmax = (nint)absmax2, NestedMap = (nint)map,
                        Offset = nested.Offset, NestedBlocksize = nested.Blocksize,
                    }, outputType, (nint)dst, path);
                }
            }
            else
            {
                fixed (float* absmax = s.Absmax)
                {
                    Dequantize(new FourBitPointers
                    {
                        Packed = (nint)packed, Count = s.Count, Blocksize = s.Blocksize, QuantType = s.QuantType, Absmax = (nint)absmax,
                    }, outputType, (nint)dst, path);
                }
            }
        }
    }

    /// <summary>
    /// Dequantizes from host addresses into <paramref name="destination"/> (Count elements of <paramref name="outputType"/>).
    /// The caller keeps every buffer alive and pinned for the duration of the call.
    /// </summary>
    public static void Dequantize(in FourBitPointers source, FloatType outputType, nint destination, Path path = Path.Auto)
    {
        QuantTypes.ValidateBlocksize(source.Blocksize);
        if (source.Count < 0) throw new ArgumentOutOfRangeException(nameof(source), "negative element count");
        if (source.Count == 0) return;
        if (source.Packed == 0 || destination == 0 || (source.Absmax == 0 && source.AbsmaxCodes == 0))
            throw new ArgumentException("null buffer address", nameof(source));
        if (source.IsDoubleQuantized && (source.NestedAbsmax == 0 || source.NestedMap == 0 || source.NestedBlocksize <= 0))
            throw new ArgumentException("double-quantized source without nested absmax, map or blocksize", nameof(source));
        path = Resolve(path);

        long blocksPerChunk = Math.Max(1, ChunkElements / source.Blocksize);
        long chunkCount = (source.BlockCount + blocksPerChunk - 1) / blocksPerChunk;
        var src = source;
        if (source.Count < ParallelThreshold || chunkCount == 1)
        {
            for (long c = 0; c < chunkCount; c++) DequantizeChunk(src, outputType, destination, path, c, blocksPerChunk);
        }
        else
        {
            Parallel.For(0L, chunkCount, c => DequantizeChunk(src, outputType, destination, path, c, blocksPerChunk));
        }
    }

    /// <summary>The path <see cref="Path.Auto"/> resolves to on this CPU.</summary>
    public static Path BestPath => Avx512BW.IsSupported ? Path.Avx512 : Ssse3.IsSupported ? Path.Ssse3 : Path.Scalar;

    private static Path Resolve(Path path) => path switch
    {
        Path.Auto => BestPath,
        Path.Avx512 when !Avx512BW.IsSupported => throw new PlatformNotSupportedException("AVX-512 BW is not supported on this CPU"),
        Path.Ssse3 when !Ssse3.IsSupported => throw new PlatformNotSupportedException("SSSE3 is not supported on this CPU"),
        _ => path,
    };

    private static void DequantizeChunk(in FourBitPointers s, FloatType outputType, nint destination, Path path, long chunk, long blocksPerChunk)
    {
        long firstBlock = chunk * blocksPerChunk;
        int blocks = (int)Math.Min(blocksPerChunk, s.BlockCount - firstBlock);
        float* absmax = stackalloc float[blocks];
        if (s.IsDoubleQuantized)
        {
            byte* codes = (byte*)s.AbsmaxCodes + firstBlock;
            float* absmax2 = (float*)s.NestedAbsmax, map = (float*)s.NestedMap;
            long nested = firstBlock / s.NestedBlocksize;
            int left = (int)(s.NestedBlocksize - firstBlock % s.NestedBlocksize); // blocks left in this nested block
            float scale = absmax2[nested], offset = s.Offset;
            for (int i = 0; i < blocks; i++)
            {
                if (left == 0) { scale = absmax2[++nested]; left = s.NestedBlocksize; }
                left--;
                float a = map[codes[i]] * scale; // two float32 roundings; .NET never fuses these
                absmax[i] = a + offset;
            }
        }
        else
        {
            new ReadOnlySpan<float>((float*)s.Absmax + firstBlock, blocks).CopyTo(new Span<float>(absmax, blocks));
        }

        if (path == Path.Avx512 && outputType == FloatType.BFloat16)
        {
            ChunkBf16Avx512(s, absmax, firstBlock, blocks, (ushort*)destination);
            return;
        }

        ReadOnlySpan<float> table = s.QuantType.Table();
        byte* packed = (byte*)s.Packed;
        int outSize = outputType.Size();
        for (int i = 0; i < blocks; i++)
        {
            long start = (firstBlock + i) * s.Blocksize;
            int len = (int)Math.Min(s.Blocksize, s.Count - start);
            byte* p = packed + (start >> 1);
            byte* d = (byte*)destination + start * outSize;
            switch (outputType)
            {
                case FloatType.Float32: BlockF32(table, absmax[i], p, (float*)d, len, path); break;
                case FloatType.BFloat16: Block16(table, absmax[i], p, (ushort*)d, len, path, bf16: true); break;
                default: Block16(table, absmax[i], p, (ushort*)d, len, path, bf16: false); break;
            }
        }
    }

    /// <summary>
    /// The hot path (bf16 on AVX-512): per block, the 16 products are rounded to bf16 in one register and each 16 bytes of
    /// codes become 32 outputs through one word permute. Large aligned outputs use non-temporal stores, as memcpy does.
    /// </summary>
    private static void ChunkBf16Avx512(in FourBitPointers s, float* absmax, long firstBlock, int blocks, ushort* destination)
    {
        var tableF = Vector512.Create(s.QuantType.Table());
        var one = Vector512<uint>.One;
        var bias = Vector512.Create(0x7FFFu);
        var nanBits = Vector512.Create((uint)BFloat16.NaN);
        var low = Vector512.Create(0xFu);
        byte* packed = (byte*)s.Packed;
        ushort* t = stackalloc ushort[32];
        bool streaming = s.Count * 2 >= (1 << 22) && ((nint)destination & 63) == 0; // blocksize >= 32 keeps every 64-byte store aligned
        for (int i = 0; i < blocks; i++)
        {
            long start = (firstBlock + i) * s.Blocksize;
            int len = (int)Math.Min(s.Blocksize, s.Count - start);
            var v = tableF * Vector512.Create(absmax[i]);
            var bits = v.AsUInt32();
            var rounded = (bits + bias + ((bits >> 16) & one)) >> 16;
            rounded = Vector512.ConditionalSelect(Vector512.Equals(v, v).AsUInt32(), rounded, nanBits);
            var tv = Avx512F.ConvertToVector256UInt16(rounded).ToVector512Unsafe(); // lanes 16..31 are never indexed
            byte* p = packed + (start >> 1);
            ushort* d = destination + start;
            int e = 0;
            if (streaming)
            {
                for (; e + 32 <= len; e += 32)
                {
                    var x = Avx512F.ConvertToVector512UInt32(Vector128.Load(p + (e >> 1)));
                    var idx = ((x >> 4) | ((x & low) << 16)).AsUInt16();
                    Avx512F.StoreAlignedNonTemporal(d + e, Avx512BW.PermuteVar32x16(tv, idx));
                }
            }
            else
            {
                for (; e + 32 <= len; e += 32)
                {
                    var x = Avx512F.ConvertToVector512UInt32(Vector128.Load(p + (e >> 1)));
                    var idx = ((x >> 4) | ((x & low) << 16)).AsUInt16();
                    Avx512BW.PermuteVar32x16(tv, idx).Store(d + e);
                }
            }
            if (e < len)
            {
                tv.Store(t);
                for (; e < len; e++)
                {
                    byte b = p[e >> 1];
                    d[e] = t[(e & 1) == 0 ? b >> 4 : b & 0xF];
                }
            }
        }
        if (streaming) Sse.StoreFence();
    }

    /// <summary>bf16 or fp16 output: a 16-entry table of 16-bit results per block, then lookups.</summary>
    private static void Block16(ReadOnlySpan<float> table, float absmax, byte* p, ushort* d, int len, Path path, bool bf16)
    {
        ushort* t = stackalloc ushort[32];
        if (path == Path.Avx512 && bf16)
        {
            // table * absmax in float32 lanes, then integer round-to-nearest-even, NaN -> 0x7FC0 (as BFloat16.FromFloat).
            var v = Vector512.Create(table) * Vector512.Create(absmax);
            var bits = v.AsUInt32();
            var rounded = (bits + Vector512.Create(0x7FFFu) + ((bits >> 16) & Vector512<uint>.One)) >> 16;
            var nan = Vector512.Equals(v, v).AsUInt32();
            rounded = Vector512.ConditionalSelect(nan, rounded, Vector512.Create((uint)BFloat16.NaN));
            Avx512F.ConvertToVector256UInt16(rounded).Store(t);
        }
        else
        {
            for (int c = 0; c < 16; c++)
            {
                float v = table[c] * absmax;
                t[c] = bf16 ? BFloat16.FromFloat(v) : BitConverter.HalfToUInt16Bits((Half)v);
            }
        }

        int e = 0;
        if (path == Path.Avx512)
        {
            var tv = Vector512.Load(t); // lanes 16..31 are never indexed
            for (; e + 32 <= len; e += 32)
            {
                var x = Avx512F.ConvertToVector512UInt32(Vector128.Load(p + (e >> 1)));
                var idx = ((x >> 4) | ((x & Vector512.Create(0xFu)) << 16)).AsUInt16();
                Avx512BW.PermuteVar32x16(tv, idx).Store(d + e);
            }
        }
        else if (path == Path.Ssse3)
        {
            byte* lo = stackalloc byte[16];
            byte* hi = stackalloc byte[16];
            for (int c = 0; c < 16; c++) { lo[c] = (byte)t[c]; hi[c] = (byte)(t[c] >> 8); }
            var tLo = Vector128.Load(lo);
            var tHi = Vector128.Load(hi);
            var mask = Vector128.Create((byte)0xF);
            for (; e + 32 <= len; e += 32)
            {
                var x = Vector128.Load(p + (e >> 1));
                var h = Sse2.ShiftRightLogical(x.AsUInt16(), 4).AsByte() & mask;
                var l = x & mask;
                var c0 = Sse2.UnpackLow(h, l);  // codes of elements e .. e+15 in order
                var c1 = Sse2.UnpackHigh(h, l); // codes of elements e+16 .. e+31
                var lo0 = Ssse3.Shuffle(tLo, c0); var hi0 = Ssse3.Shuffle(tHi, c0);
                var lo1 = Ssse3.Shuffle(tLo, c1); var hi1 = Ssse3.Shuffle(tHi, c1);
                Sse2.UnpackLow(lo0, hi0).AsUInt16().Store(d + e);
                Sse2.UnpackHigh(lo0, hi0).AsUInt16().Store(d + e + 8);
                Sse2.UnpackLow(lo1, hi1).AsUInt16().Store(d + e + 16);
                Sse2.UnpackHigh(lo1, hi1).AsUInt16().Store(d + e + 24);
            }
        }
        for (; e < len; e++)
        {
            byte b = p[e >> 1];
            d[e] = t[(e & 1) == 0 ? b >> 4 : b & 0xF];
        }
    }

    /// <summary>fp32 output: the 16 products themselves are the table.</summary>
    private static void BlockF32(ReadOnlySpan<float> table, float absmax, byte* p, float* d, int len, Path path)
    {
        float* t = stackalloc float[16];
        for (int c = 0; c < 16; c++) t[c] = table[c] * absmax;
        int e = 0;
        if (path == Path.Avx512)
        {
            var tv = Vector512.Load(t);
            for (; e + 32 <= len; e += 32)
            {
                var x = Avx512F.ConvertToVector512UInt32(Vector128.Load(p + (e >> 1)));
                var idx = ((x >> 4) | ((x & Vector512.Create(0xFu)) << 16)).AsUInt16();
                var i0 = Avx512F.ConvertToVector512UInt32(idx.GetLower()).AsInt32();
                var i1 = Avx512F.ConvertToVector512UInt32(idx.GetUpper()).AsInt32();
                Avx512F.PermuteVar16x32(tv, i0).Store(d + e);
                Avx512F.PermuteVar16x32(tv, i1).Store(d + e + 16);
            }
        }
        for (; e < len; e++)
        {
            byte b = p[e >> 1];
            d[e] = t[(e & 1) == 0 ? b >> 4 : b & 0xF];
        }
    }
}
