using System.Buffers.Binary;

namespace QLora.Quant.Gguf;

/// <summary>
/// ggml's <c>dequantize_row_*</c> for the types <see cref="GgmlQuantizer"/> writes: what llama.cpp computes with. Used to
/// check exported tensors and to measure quantization error.
/// </summary>
public static class GgmlDequantizer
{
    /// <summary>Decodes <paramref name="source"/> (whole blocks of <paramref name="type"/>) into <paramref name="destination"/>.</summary>
    public static void Dequantize(GgmlType type, ReadOnlySpan<byte> source, Span<float> destination)
    {
        int block = type.BlockSize(), bytes = type.BlockBytes();
        if (source.Length % bytes != 0 || destination.Length != source.Length / bytes * block)
            throw new ArgumentException($"{source.Length} bytes of {type.Name()} do not decode to {destination.Length} values", nameof(destination));
        for (int b = 0; b < source.Length / bytes; b++)
        {
            var x = source.Slice(b * bytes, bytes);
            var y = destination.Slice(b * block, block);
            switch (type)
            {
                case GgmlType.F32: y[0] = BinaryPrimitives.ReadSingleLittleEndian(x); break;
                case GgmlType.F16: y[0] = (float)BinaryPrimitives.ReadHalfLittleEndian(x); break;
                case GgmlType.BF16: y[0] = BFloat16.ToFloat(BinaryPrimitives.ReadUInt16LittleEndian(x)); break;
                case GgmlType.Q8_0:
                {
                    float d = Half(x, 0);
                    for (int j = 0; j < 32; j++) y[j] = (sbyte)x[2 + j] * d;
                    break;
                }
                case GgmlType.Q4_0:
                {
                    float d = Half(x, 0);
                    for (int j = 0; j < 16; j++)
                    {
                        y[j] = ((x[2 + j] & 0x0F) - 8) * d;
                        y[j + 16] = ((x[2 + j] >> 4) - 8) * d;
                    }
                    break;
                }
                case GgmlType.Q5_0:
                {
                    float d = Half(x, 0);
                    uint qh = BinaryPrimitives.ReadUInt32LittleEndian(x[2..]);
                    for (int j = 0; j < 16; j++)
                    {
                        int h0 = (int)((qh >> j) << 4) & 0x10;
                        int h1 = (int)(qh >> (j + 12)) & 0x10;
                        y[j] = (((x[6 + j] & 0x0F) | h0) - 16) * d;
                        y[j + 16] = (((x[6 + j] >> 4) | h1) - 16) * d;
                    }
                    break;
                }
                case GgmlType.Q4_K:
                {
                    float d = Half(x, 0), min = Half(x, 2);
                    var scales = x.Slice(4, 12);
                    var q = x.Slice(16, 128);
                    for (int j = 0, s = 0, o = 0, qo = 0; j < 256; j += 64, s += 2, qo += 32)
                    {
                        GgmlQuantizer.ScaleMinK4(s, scales, out byte sc, out byte m);
                        float d1 = d * sc, m1 = min * m;
                        GgmlQuantizer.ScaleMinK4(s + 1, scales, out sc, out m);
                        float d2 = d * sc, m2 = min * m;
                        for (int l = 0; l < 32; l++) y[o++] = d1 * (q[qo + l] & 0xF) - m1;
                        for (int l = 0; l < 32; l++) y[o++] = d2 * (q[qo + l] >> 4) - m2;
                    }
                    break;
                }
                case GgmlType.Q5_K:
                {
                    float d = Half(x, 0), min = Half(x, 2);
                    var scales = x.Slice(4, 12);
                    var qh = x.Slice(16, 32);
                    var ql = x.Slice(48, 128);
                    int u1 = 1, u2 = 2;
                    for (int j = 0, s = 0, o = 0, qo = 0; j < 256; j += 64, s += 2, qo += 32, u1 <<= 2, u2 <<= 2)
                    {
                        GgmlQuantizer.ScaleMinK4(s, scales, out byte sc, out byte m);
                        float d1 = d * sc, m1 = min * m;
                        GgmlQuantizer.ScaleMinK4(s + 1, scales, out sc, out m);
                        float d2 = d * sc, m2 = min * m;
                        for (int l = 0; l < 32; l++) y[o++] = d1 * ((ql[qo + l] & 0xF) + ((qh[l] & u1) != 0 ? 16 : 0)) - m1;
                        for (int l = 0; l < 32; l++) y[o++] = d2 * ((ql[qo + l] >> 4) + ((qh[l] & u2) != 0 ? 16 : 0)) - m2;
                    }
                    break;
                }
                case GgmlType.Q6_K:
                {
                    float d = Half(x, 208);
                    for (int n = 0; n < 2; n++)
                    {
                        var ql = x.Slice(64 * n, 64);
                        var qh = x.Slice(128 + 32 * n, 32);
                        var sc = x.Slice(192 + 8 * n, 8);
                        var yy = y.Slice(128 * n, 128);
                        for (int l = 0; l < 32; l++)
                        {
                            int s = l / 16;
                            int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                            int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                            int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                            yy[l] = d * (sbyte)sc[s] * q1;
                            yy[l + 32] = d * (sbyte)sc[s + 2] * q2;
                            yy[l + 64] = d * (sbyte)sc[s + 4] * q3;
                            yy[l + 96] = d * (sbyte)sc[s + 6] * q4;
                        }
                    }
                    break;
                }
                default: throw new ArgumentOutOfRangeException(nameof(type), type, "no dequantizer");
            }
        }
    }

    private static float Half(ReadOnlySpan<byte> x, int offset) => (float)BinaryPrimitives.ReadHalfLittleEndian(x[offset..]);
}
