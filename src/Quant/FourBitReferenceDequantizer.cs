namespace QLora.Quant;

/// <summary>
/// The scalar reference for 4-bit dequantization: <c>out[e] = (float)(table[code(e)] · absmax[e / blocksize])</c>,
/// rounded to nearest even into the output type. Every fast path (SIMD, GPU) must equal it bit for bit.
/// </summary>
public static class FourBitReferenceDequantizer
{
    /// <summary>Dequantizes <paramref name="tensor"/> into <paramref name="destination"/> (Count elements of <paramref name="outputType"/>).</summary>
    public static void Dequantize(QuantizedTensor tensor, FloatType outputType, Span<byte> destination)
    {
        var s = tensor.State;
        Dequantize(tensor.Packed, s.DecodeAbsmax(), s.Count, s.Blocksize, s.QuantType, outputType, destination);
    }

    /// <summary>Dequantizes <paramref name="count"/> elements from packed codes and decoded float32 absmax.</summary>
    public static void Dequantize(ReadOnlySpan<byte> packed, ReadOnlySpan<float> absmax, long count, int blocksize,
        QuantType type, FloatType outputType, Span<byte> destination)
    {
        if (destination.Length < count * outputType.Size()) throw new ArgumentException("destination too small", nameof(destination));
        var table = type.Table();
        var f32 = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(destination);
        var u16 = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(destination);
        var f16 = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, Half>(destination);
        for (int e = 0; e < count; e++)
        {
            byte b = packed[e >> 1];
            int code = (e & 1) == 0 ? b >> 4 : b & 0xF;
            float v = table[code] * absmax[e / blocksize];
            switch (outputType)
            {
                case FloatType.Float32: f32[e] = v; break;
                case FloatType.BFloat16: u16[e] = BFloat16.FromFloat(v); break;
                default: f16[e] = (Half)v; break;
            }
        }
    }
}
