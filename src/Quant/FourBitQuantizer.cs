using System.Numerics;
using System.Runtime.InteropServices;

namespace QLora.Quant;

/// <summary>
/// Blockwise 4-bit quantization (bitsandbytes <c>quantize_4bit</c>): per block absmax, one float32 reciprocal, a
/// multiply per element, the nearest code, two codes per byte with the even element in the high nibble.
/// </summary>
public static class FourBitQuantizer
{
    /// <summary>
    /// Quantizes raw elements of <paramref name="dtype"/> (little-endian bytes) with the given shape.
    /// An all-zero block gets code 0.0 everywhere (bitsandbytes' CUDA kernel writes code 0 there via 0·∞ = NaN; its
    /// CPU backend and this project write the zero code, so such a block decodes to exact zeros).
    /// </summary>
    public static QuantizedTensor Quantize(ReadOnlySpan<byte> data, FloatType dtype, long[] shape,
        QuantType quantType = QuantType.Nf4, int blocksize = 64, bool doubleQuant = true)
    {
        QuantTypes.ValidateBlocksize(blocksize);
        long n = TensorShape.ElementCount(shape);
        if (data.Length != n * dtype.Size())
            throw new ArgumentException($"data has {data.Length} bytes, expected {n * dtype.Size()} for shape [{string.Join(", ", shape)}] of {dtype.Name()}");

        long nBlocks = (n + blocksize - 1) / blocksize;
        var packed = new byte[(n + 1) / 2];
        var absmax = new float[nBlocks];
        int elementSize = dtype.Size();
        long blocksPerChunk = Math.Max(1, (1 << 16) / blocksize);
        long chunks = (nBlocks + blocksPerChunk - 1) / blocksPerChunk;
        unsafe
        {
            fixed (byte* dataPtr = data)
            {
                byte* p = dataPtr; // captured by the workers; the span stays pinned for the loop
                void Chunk(long c)
                {
                    var buffer = new float[blocksize];
                    long end = Math.Min(nBlocks, (c + 1) * blocksPerChunk);
                    for (long b = c * blocksPerChunk; b < end; b++)
                    {
                        long start = b * blocksize;
                        int len = (int)Math.Min(blocksize, n - start);
                        var block = buffer.AsSpan(0, len);
                        FloatTypes.ToFloat32(new ReadOnlySpan<byte>(p + start * elementSize, len * elementSize), dtype, block);
                        absmax[b] = QuantizeBlock(block, quantType, packed, start);
                    }
                }
                if (chunks == 1) Chunk(0);
                else Parallel.For(0L, chunks, Chunk);
            }
        }
        if ((n & 1) == 1) packed[^1] = (byte)((packed[^1] & 0xF0) | quantType.ZeroCode());

        var state = new QuantState
        {
            QuantType = quantType, Blocksize = blocksize, DType = dtype, Shape = (long[])shape.Clone(),
            Absmax = doubleQuant ? null : absmax,
            Nested = doubleQuant ? DoubleQuantizer.Quantize(absmax) : null,
        };
        return new QuantizedTensor(packed, state);
    }

    /// <summary>Quantizes float32 values with the given shape.</summary>
    public static QuantizedTensor Quantize(ReadOnlySpan<float> values, long[] shape,
        QuantType quantType = QuantType.Nf4, int blocksize = 64, bool doubleQuant = true) =>
        Quantize(MemoryMarshal.AsBytes(values), FloatType.Float32, shape, quantType, blocksize, doubleQuant);

    /// <summary>
    /// The float32 absmax of every block (max |x|, NaN ignored) exactly as <see cref="Quantize(ReadOnlySpan{byte}, FloatType, long[], QuantType, int, bool)"/>
    /// computes it — cheap, so a writer can know the double-quantization offset (and so the quant-state JSON) before quantizing.
    /// </summary>
    public static float[] ComputeAbsmax(ReadOnlySpan<byte> data, FloatType dtype, int blocksize)
    {
        QuantTypes.ValidateBlocksize(blocksize);
        int elementSize = dtype.Size();
        long n = data.Length / elementSize;
        var absmax = new float[(n + blocksize - 1) / blocksize];
        var buffer = new float[blocksize];
        for (long b = 0; b < absmax.LongLength; b++)
        {
            long start = b * blocksize;
            int len = (int)Math.Min(blocksize, n - start);
            var block = buffer.AsSpan(0, len);
            FloatTypes.ToFloat32(data.Slice((int)(start * elementSize), len * elementSize), dtype, block);
            absmax[b] = BlockAbsmax(block);
        }
        return absmax;
    }

    private static float BlockAbsmax(ReadOnlySpan<float> block)
    {
        int e = 0;
        float m = 0f;
        if (Vector.IsHardwareAccelerated && block.Length >= Vector<float>.Count)
        {
            var vm = Vector<float>.Zero;
            for (; e + Vector<float>.Count <= block.Length; e += Vector<float>.Count)
            {
                var a = Vector.Abs(new Vector<float>(block[e..]));
                vm = Vector.ConditionalSelect(Vector.GreaterThan(a, vm), a, vm); // NaN compares false: ignored
            }
            for (int j = 0; j < Vector<float>.Count; j++) if (vm[j] > m) m = vm[j];
        }
        for (; e < block.Length; e++)
        {
            float a = MathF.Abs(block[e]);
            if (a > m) m = a; // NaN is ignored, like fmaxf
        }
        return m;
    }

    /// <summary>Quantizes one block whose first element is element <paramref name="start"/> (even); returns its absmax.</summary>
    private static float QuantizeBlock(ReadOnlySpan<float> block, QuantType type, byte[] packed, long start)
    {
        float m = BlockAbsmax(block);
        byte zero = type.ZeroCode();
        long byteIndex = start >> 1;
        if (m == 0f)
        {
            // An all-zero block gets the zero code (see Quantize).
            for (int i = 0; i < block.Length; i += 2) packed[byteIndex + (i >> 1)] = (byte)(zero << 4 | zero);
            return m;
        }
        float inv = 1.0f / m;
        Span<byte> codes = stackalloc byte[block.Length + 1];
        int e = 0;
        if (type == QuantType.Nf4 && Vector.IsHardwareAccelerated)
        {
            // The same float32 multiply and the same strict comparisons as Nf4Codebook.Encode, a vector at a time.
            var vinv = new Vector<float>(inv);
            var t = Nf4Codebook.Thresholds;
            Span<int> lanes = stackalloc int[Vector<int>.Count];
            for (; e + Vector<float>.Count <= block.Length; e += Vector<float>.Count)
            {
                var x = new Vector<float>(block[e..]) * vinv;
                var c = Vector<int>.Zero;
                for (int k = 0; k < t.Length; k++) c -= Vector.GreaterThan(x, new Vector<float>(t[k]));
                c.CopyTo(lanes);
                for (int j = 0; j < lanes.Length; j++) codes[e + j] = (byte)lanes[j];
            }
        }
        for (; e < block.Length; e++) codes[e] = type.Encode(block[e] * inv);
        codes[block.Length] = zero; // the odd tail's low nibble
        for (int i = 0; i < block.Length; i += 2)
            packed[byteIndex + (i >> 1)] = (byte)(codes[i] << 4 | codes[i + 1]);
        return m;
    }
}
