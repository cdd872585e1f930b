using System.Buffers.Binary;
using System.Text;
using QLora.Quant.Gguf;

namespace QLora.Quant.Tests.Gguf;

public sealed class GgufWriterTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public void Header_metadata_and_tensor_infos_follow_the_published_layout()
    {
        var path = _dir.File("a.gguf");
        using (var w = new GgufWriter(path))
        {
            w.Add("general.architecture", GgufValue.String("llama"));
            w.Declare("t", GgmlType.F32, [2, 3]);
            w.Write("t", Floats(1, 2, 3, 4, 5, 6));
            w.Commit();
        }
        var b = File.ReadAllBytes(path);
        // Worked out by hand from ggml's docs/gguf.md: magic, version 3, 1 tensor, 2 kv (ours + general.alignment).
        Assert.Equal("GGUF"u8.ToArray(), b[..4]);
        Assert.Equal(3u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(4)));
        Assert.Equal(1ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(8)));
        Assert.Equal(2ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(16)));
        int p = 24;
        Assert.Equal(20ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(p))); p += 8;
        Assert.Equal("general.architecture", Encoding.UTF8.GetString(b, p, 20)); p += 20;
        Assert.Equal(8u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(p))); p += 4; // string
        Assert.Equal(5ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(p))); p += 8;
        Assert.Equal("llama", Encoding.UTF8.GetString(b, p, 5)); p += 5;
        Assert.Equal(17ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(p))); p += 8;
        Assert.Equal("general.alignment", Encoding.UTF8.GetString(b, p, 17)); p += 17;
        Assert.Equal(4u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(p))); p += 4; // uint32
        Assert.Equal(32u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(p))); p += 4;
        // tensor info: name, n_dims, ne[0] = 3 (the row), ne[1] = 2, type F32 = 0, offset 0
        Assert.Equal(1ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(p))); p += 8;
        Assert.Equal((byte)'t', b[p]); p += 1;
        Assert.Equal(2u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(p))); p += 4;
        Assert.Equal(3ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(p))); p += 8;
        Assert.Equal(2ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(p))); p += 8;
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(p))); p += 4;
        Assert.Equal(0ul, BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(p))); p += 8;
        int data = (p + 31) / 32 * 32;
        Assert.All(b[p..data], x => Assert.Equal(0, x));
        Assert.Equal(6f, BinaryPrimitives.ReadSingleLittleEndian(b.AsSpan(data + 20)));
        Assert.Equal(data + 32, b.Length); // the data section ends padded to the alignment
    }

    [Fact]
    public void Every_metadata_type_and_array_round_trips_and_tensors_are_aligned()
    {
        var path = _dir.File("b.gguf");
        var values = new (string, GgufValue)[]
        {
            ("u8", GgufValue.UInt8(200)), ("i8", GgufValue.Int8(-5)), ("u16", GgufValue.UInt16(60000)), ("i16", GgufValue.Int16(-300)),
            ("u32", GgufValue.UInt32(4_000_000_000)), ("i32", GgufValue.Int32(-7)), ("f32", GgufValue.Float32(1.5f)),
            ("bool", GgufValue.Bool(true)), ("str", GgufValue.String("héllo ▁")), ("u64", GgufValue.UInt64(ulong.MaxValue)),
            ("i64", GgufValue.Int64(long.MinValue)), ("f64", GgufValue.Float64(Math.PI)),
            ("strs", GgufValue.Strings(["a", "", "Ġb"])), ("ints", GgufValue.Int32s([1, -2, 3])), ("floats", GgufValue.Float32s([0.25f, -1f])),
            ("bools", GgufValue.Array(GgufValueType.Bool, new[] { true, false })),
        };
        using (var w = new GgufWriter(path))
        {
            foreach (var (k, v) in values) w.Add(k, v);
            w.Declare("a", GgmlType.F16, [3]);
            w.Declare("b", GgmlType.Q8_0, [2, 32]);
            w.Write("b", new byte[68]);
            w.Append("a", new byte[4]);
            w.Append("a", new byte[] { 1, 2 });
            w.Commit();
        }
        using var r = GgufReader.Open(path);
        Assert.Equal(3u, r.Version);
        Assert.Equal(values.Length + 1, r.Metadata.Count);
        foreach (var (k, v) in values)
        {
            var got = r.MetadataByKey[k];
            Assert.Equal(v.Type, got.Type);
            if (v.Value is Array a) Assert.Equal(a.Cast<object>(), ((Array)got.Value).Cast<object>());
            else Assert.Equal(v.Value, got.Value);
        }
        Assert.Equal(32L, r.MetadataByKey["general.alignment"].AsInt64());
        Assert.Equal([3L], r.GetInfo("a").Shape);
        Assert.Equal([2L, 32L], r.GetInfo("b").Shape);
        Assert.Equal(0, r.GetInfo("a").Offset);
        Assert.Equal(32, r.GetInfo("b").Offset);
        Assert.Equal(0, r.DataOffset % 32);
        Assert.Equal(new byte[] { 0, 0, 0, 0, 1, 2 }, r.ReadTensor("a"));
    }

    [Fact]
    public void An_uncommitted_writer_leaves_the_existing_file_and_no_temporary()
    {
        var path = _dir.File("c.gguf");
        File.WriteAllText(path, "old");
        using (var w = new GgufWriter(path))
        {
            w.Declare("a", GgmlType.F32, [1]);
            w.Write("a", new byte[4]);
        }
        Assert.Equal("old", File.ReadAllText(path));
        Assert.Single(Directory.GetFiles(_dir.Path));
    }

    [Fact]
    public void Commit_refuses_a_tensor_not_completely_written_and_rows_must_hold_whole_blocks()
    {
        using var w = new GgufWriter(_dir.File("d.gguf"));
        Assert.Throws<ArgumentException>(() => w.Declare("q", GgmlType.Q4_K, [2, 255]));
        w.Declare("a", GgmlType.F32, [2]);
        w.Append("a", new byte[4]);
        Assert.Throws<InvalidOperationException>(() => w.Commit());
    }

    [Fact]
    public void The_reader_names_the_file_for_bad_magic_and_truncation()
    {
        var bad = _dir.File("bad.gguf");
        File.WriteAllBytes(bad, "GGML\x03\0\0\0"u8.ToArray());
        var e = Assert.Throws<GgufFormatException>(() => GgufReader.Open(bad));
        Assert.StartsWith(bad, e.Message);
        var cut = _dir.File("cut.gguf");
        File.WriteAllBytes(cut, "GGUF\x03\0\0\0\x01\0\0\0"u8.ToArray());
        Assert.Contains("truncated", Assert.Throws<GgufFormatException>(() => GgufReader.Open(cut)).Message);
    }

    private static byte[] Floats(params float[] v)
    {
        var b = new byte[v.Length * 4];
        for (int i = 0; i < v.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(b.AsSpan(4 * i), v[i]);
        return b;
    }
}
