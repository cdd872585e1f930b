using System.Text;

namespace QLora.Quant.Tests;

public sealed class SafetensorsReaderTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    private string Save(byte[] bytes, string name = "t.safetensors")
    {
        string path = _dir.File(name);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    private SafetensorsFormatException Malformed(byte[] bytes)
    {
        string path = Save(bytes);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path).Dispose());
        Assert.Equal(path, e.FilePath);
        Assert.StartsWith(path + ": ", e.Message);
        return e;
    }

    private SafetensorsFormatException Malformed(string json, int dataLength) => Malformed(RawSafetensors.Build(json, RawSafetensors.Sequence(dataLength)));

    [Fact]
    public void ReadsHandBuiltFile()
    {
        // Unpadded header: data starts at an odd offset, which readers must still handle.
        var floats = new float[] { 1, -2, 3.5f, 0, 1e-3f, float.MaxValue };
        var data = new byte[24 + 8 + 2];
        Buffer.BlockCopy(floats, 0, data, 0, 24);
        BitConverter.GetBytes(-42L).CopyTo(data, 24);
        data[32] = 0x80; data[33] = 0x3F; // bf16 1.0
        string json = """{"__metadata__":{"format":"pt","x":"y"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"s":{"dtype":"I64","shape":[],"data_offsets":[24,32]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[32,34]}}""";
        string path = Save(RawSafetensors.Build(json, data));
        int headerLength = Encoding.UTF8.GetByteCount(json);

        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(path, reader.Path);
        Assert.Equal(8 + headerLength, reader.DataStart);
        Assert.Equal(new Dictionary<string, string> { ["format"] = "pt", ["x"] = "y" }, reader.Metadata);
        Assert.Equal(["w", "s", "b"], reader.Tensors.Select(t => t.Name));

        var w = reader.GetInfo("w");
        Assert.Equal(TensorDType.F32, w.DType);
        Assert.Equal([2L, 3L], w.Shape);
        Assert.Equal(8 + headerLength, w.DataOffset);
        Assert.Equal(24, w.ByteLength);
        Assert.Equal(6, w.ElementCount);
        Assert.Equal(floats, reader.Read<float>("w"));
        Assert.Equal(data[..24], reader.GetSpan("w").ToArray());
        Assert.Equal(data[..24], reader.ReadBytes("w"));

        var s = reader.GetInfo("s");
        Assert.Empty(s.Shape);
        Assert.Equal(1, s.ElementCount);
        Assert.Equal([-42L], reader.Read<long>("s"));
        Assert.Equal(1.0f, BFloat16.ToFloat(reader.Read<ushort>("b")[0]));

        unsafe
        {
            Assert.Equal(-42L, *(long*)reader.GetPointer("s"));
        }
        var destination = new byte[40];
        reader.ReadInto("s", destination);
        Assert.Equal(data[24..32], destination[..8]);
        Assert.True(reader.Contains("w"));
        Assert.False(reader.Contains("missing"));
    }

    [Fact]
    public void EmptyHeaderAndNullMetadataAreValid()
    {
        using (var r = SafetensorsReader.Open(Save(RawSafetensors.Build("{}", []))))
        {
            Assert.Empty(r.Tensors);
            Assert.Empty(r.Metadata);
        }
        using (var r = SafetensorsReader.Open(Save(RawSafetensors.Build("""{"__metadata__":null}      """, []))))
            Assert.Empty(r.Metadata);
    }

    [Fact]
    public void ToleratesGapsTrailingBytesUnknownKeysAndZeroSizeTensorsAnywhere()
    {
        string json = """{"a":{"dtype":"U8","shape":[2],"data_offsets":[4,6],"extra":{"k":[1,2]}},"z":{"dtype":"F32","shape":[0,3],"data_offsets":[5,5]}}""";
        using var r = SafetensorsReader.Open(Save(RawSafetensors.Build(json, RawSafetensors.Sequence(10))));
        Assert.Equal(RawSafetensors.Sequence(10)[4..6], r.ReadBytes("a"));
        Assert.Empty(r.ReadBytes("z"));
        Assert.Empty(r.Read<float>("z"));
        Assert.Equal(0, r.GetSpan("z").Length);
    }

    [Fact]
    public void SlicesOfATensor()
    {
        string json = """{"w":{"dtype":"U8","shape":[10],"data_offsets":[0,10]}}""";
        using var r = SafetensorsReader.Open(Save(RawSafetensors.Build(json, RawSafetensors.Sequence(10))));
        Assert.Equal(RawSafetensors.Sequence(10)[3..7], r.GetSpan("w", 3, 4).ToArray());
        Assert.Equal(0, r.GetSpan("w", 10, 0).Length);
        Assert.Throws<ArgumentOutOfRangeException>(() => r.GetSpan("w", 7, 4).Length);
        Assert.Throws<ArgumentOutOfRangeException>(() => r.GetSpan("w", -1, 1).Length);
        Assert.Throws<ArgumentOutOfRangeException>(() => r.GetSpan("w", long.MaxValue, 1).Length);
    }

    [Fact]
    public unsafe void FortyGigabyteSparseFileIsReadWithoutLoadingIt()
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsMacOS()) return; // needs sparse files
        const long huge = 40_000_000_000;
        string json = $$$"""{"huge":{"dtype":"U8","shape":[{{{huge}}}],"data_offsets":[0,{{{huge}}}]},"tail":{"dtype":"F32","shape":[1],"data_offsets":[{{{huge}}},{{{huge + 4}}}]}}""";
        byte[] header = RawSafetensors.Build(json, []);
        string path = _dir.File("huge.safetensors");
        long dataStart = header.Length;
        using (var stream = new FileStream(path, FileMode.CreateNew))
        {
            stream.Write(header);
            stream.SetLength(dataStart + huge + 4);
            stream.Position = dataStart + 3_000_000_000;
            stream.Write([1, 2, 3]);
            stream.Position = dataStart + huge - 1;
            stream.Write([42, 0, 0, 0x80, 0x3F]);
        }
        using var r = SafetensorsReader.Open(path);
        Assert.Equal(huge, r.GetInfo("huge").ByteLength);
        Assert.Throws<InvalidOperationException>(() => r.GetSpan("huge").Length);
        Assert.Throws<InvalidOperationException>(() => r.ReadBytes("huge"));
        Assert.Throws<InvalidOperationException>(() => r.Read<byte>("huge"));
        byte* p = (byte*)r.GetPointer("huge");
        Assert.Equal(42, p[huge - 1]);
        Assert.Equal([1, 2, 3], r.GetSpan("huge", 3_000_000_000, 3).ToArray());
        Assert.Equal([1.0f], r.Read<float>("tail"));
    }

    [Fact]
    public void MissingTensorErrorNamesFileAndTensor()
    {
        string path = Save(RawSafetensors.Build("{}", []));
        using var r = SafetensorsReader.Open(path);
        var e = Assert.Throws<KeyNotFoundException>(() => r.GetInfo("model.embed"));
        Assert.Contains(path, e.Message);
        Assert.Contains("model.embed", e.Message);
    }

    [Fact]
    public void ReadChecksElementSizeAndDestinationLength()
    {
        string json = """{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""";
        using var r = SafetensorsReader.Open(Save(RawSafetensors.Build(json, new byte[8])));
        Assert.Throws<ArgumentException>(() => r.Read<double>("w"));
        Assert.Throws<ArgumentException>(() => r.Read<ushort>("w"));
        Assert.Equal(2, r.Read<int>("w").Length);
        Assert.Throws<ArgumentException>(() => r.ReadInto("w", new byte[7]));
    }

    [Fact]
    public void DisposedReaderRefusesAccess()
    {
        string json = """{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}""";
        var r = SafetensorsReader.Open(Save(RawSafetensors.Build(json, new byte[2])));
        r.Dispose();
        r.Dispose();
        Assert.Throws<ObjectDisposedException>(() => r.ReadBytes("w"));
        Assert.Throws<ObjectDisposedException>(() => r.GetPointer("w"));
    }

    [Fact]
    public void FileCanBeReplacedAndDeletedWhileOpen()
    {
        string json = """{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}""";
        string path = Save(RawSafetensors.Build(json, [5, 6]));
        using var r = SafetensorsReader.Open(path);
        SafetensorsWriter.WriteFile(path, [("v", TensorDType.U8, [1], [9])]);
        Assert.Equal([5, 6], r.ReadBytes("w"));
        using var r2 = SafetensorsReader.Open(path);
        Assert.Equal([9], r2.ReadBytes("v"));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(7)]
    public void TooShortFile(int length)
    {
        Assert.Contains("too short", Malformed(new byte[length]).Problem);
    }

    [Fact]
    public void EveryTruncationOfAValidFileIsRejected()
    {
        string json = """{"__metadata__":{"format":"pt"},"a":{"dtype":"F16","shape":[3],"data_offsets":[0,6]},"b":{"dtype":"I32","shape":[2,2],"data_offsets":[6,22]}}   """;
        byte[] file = RawSafetensors.Build(json, RawSafetensors.Sequence(22));
        using (SafetensorsReader.Open(Save(file, "full.safetensors"))) { }
        for (int length = 0; length < file.Length; length++) Malformed(file[..length]);
    }

    [Theory]
    [InlineData(1000UL, "runs past the end")]
    [InlineData(9_223_372_036_854_775_808UL, "exceeds")]
    [InlineData(ulong.MaxValue, "exceeds")]
    [InlineData(100_000_001UL, "exceeds")]
    public void HeaderLengthOutOfBounds(ulong headerLength, string expected)
    {
        Assert.Contains(expected, Malformed(RawSafetensors.Build("{}", new byte[16], headerLength)).Problem);
    }

    [Fact]
    public void BadUtf8()
    {
        byte[] header = [.. "{\"a"u8.ToArray(), 0xFF, .. "\":{}}"u8.ToArray()];
        Assert.Contains("UTF-8", Malformed(RawSafetensors.Build(header, [])).Problem);
        Assert.Contains("UTF-8", Malformed(RawSafetensors.Build([(byte)'{', 0xC0, 0x80, (byte)'}'], [])).Problem);
    }

    [Theory]
    [InlineData("""{"a":""")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],}}""")]
    [InlineData("""{"a":{"dtype":"F32" "shape":[1],"data_offsets":[0,4]}}""")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x""")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}{}""")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}/**/}""")]
    [InlineData("""{'a':1}""")]
    [InlineData("""{"\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}\0\0\0")]
    public void BadJson(string json) => Malformed(json, 4);

    [Theory]
    [InlineData("[]")]
    [InlineData("\"x\"")]
    [InlineData(" {}")]
    [InlineData("null")]
    [InlineData("")]
    [InlineData("\ufeff{}")]
    public void NotAnObject(string json) => Malformed(json, 0);

    [Theory]
    [InlineData("F128")]
    [InlineData("f32")]
    [InlineData("float32")]
    [InlineData("")]
    [InlineData("F4")]
    public void UnknownDType(string dtype)
    {
        var e = Malformed($$$"""{"a":{"dtype":"{{{dtype}}}","shape":[1],"data_offsets":[0,4]}}""", 4);
        Assert.Contains("unknown dtype", e.Problem);
        Assert.Contains("'a'", e.Problem);
    }

    [Theory]
    [InlineData("""{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":[null],"data_offsets":[0,4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":[99999999999999999999999],"data_offsets":[0,4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":1,"data_offsets":[0,4]}}""", "not an array")]
    [InlineData("""{"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,4]}}""", "too large")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}""", "needs 8 bytes")]
    [InlineData("""{"a":{"dtype":"F32","shape":[],"data_offsets":[0,8]}}""", "needs 4 bytes")]
    [InlineData("""{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,4]}}""", "needs 0 bytes")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}""", "is after end")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}""", "past the 8-byte data area")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,-4]}}""", "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}""", "exactly 2")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}""", "more than 2")]
    [InlineData("""{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,9223372036854775807]}}""", "past the")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}""", "overlap")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}""", "overlap")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", "duplicate tensor name 'a'")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"\u0061":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", "duplicate tensor name 'a'")]
    [InlineData("""{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}""", "duplicate key 'dtype'")]
    [InlineData("""{"a":{"shape":[1],"data_offsets":[0,4]}}""", "missing dtype")]
    [InlineData("""{"a":{"dtype":"F32","data_offsets":[0,4]}}""", "missing shape")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1]}}""", "missing data_offsets")]
    [InlineData("""{"a":[]}""", "not an object")]
    [InlineData("""{"a":{"dtype":32,"shape":[1],"data_offsets":[0,4]}}""", "not a string")]
    [InlineData("""{"__metadata__":{"a":1}}""", "not a string")]
    [InlineData("""{"__metadata__":{"a":null}}""", "not a string")]
    [InlineData("""{"__metadata__":{"a":{"b":"c"}}}""", "not a string")]
    [InlineData("""{"__metadata__":["a"]}""", "not an object")]
    [InlineData("""{"__metadata__":"a"}""", "not an object")]
    [InlineData("""{"__metadata__":{"a":"1","a":"2"}}""", "duplicate")]
    [InlineData("""{"__metadata__":{},"__metadata__":{}}""", "duplicate")]
    public void InvalidEntries(string json, string expected)
    {
        Assert.Contains(expected, Malformed(json, 8).Problem);
    }

    [Fact]
    public void DeeplyNestedJsonIsAFormatError()
    {
        string json = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":" + new string('[', 5000) + new string(']', 5000) + "}}";
        Malformed(json, 1);
    }

    [Fact]
    public void ManyDimensionsAreBounded()
    {
        string json = "{\"a\":{\"dtype\":\"U8\",\"shape\":[" + string.Join(",", Enumerable.Repeat("1", 5000)) + "],\"data_offsets\":[0,1]}}";
        Assert.Contains("more than", Malformed(json, 1).Problem);
    }
}
