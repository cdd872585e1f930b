using System.Buffers.Binary;
using System.Text;

namespace QLora.Quant.Tests;

/// Builds safetensors bytes by hand, independently of the writer: 8-byte little-endian length, header, data.
public static class RawSafetensors
{
    public static byte[] Build(string json, byte[] data, ulong? headerLength = null) =>
        Build(Encoding.UTF8.GetBytes(json), data, headerLength);

    public static byte[] Build(byte[] header, byte[] data, ulong? headerLength = null)
    {
        var file = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(file, headerLength ?? (ulong)header.Length);
        header.CopyTo(file, 8);
        data.CopyTo(file, 8 + header.Length);
        return file;
    }

    public static byte[] Sequence(int length) => Enumerable.Range(0, length).Select(i => (byte)(i * 7 + 3)).ToArray();
}
