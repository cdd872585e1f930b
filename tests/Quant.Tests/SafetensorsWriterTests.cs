using System.Buffers.Binary;
using System.Text;
using System.Text.Json;

namespace QLora.Quant.Tests;

public sealed class SafetensorsWriterTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    /// Parses a file's raw bytes without the reader: header length, header text, parsed JSON.
    private static (long HeaderLength, string HeaderText, JsonDocument Json) ParseRaw(byte[] file)
    {
        long n = (long)BinaryPrimitives.ReadUInt64LittleEndian(file);
        string text = Encoding.UTF8.GetString(file, 8, (int)n);
        return (n, text, JsonDocument.Parse(text));
    }

    private static readonly long[][] Shapes = [[], [0], [3, 0, 2], [1], [7], [3, 5], [2, 3, 5], [1, 1, 1, 1, 3]];

    [Fact]
    public void RoundTripsEveryDTypeAndShape()
    {
        var random = new Random(1234);
        var tensors = new List<(string Name, TensorDType DType, long[] Shape, byte[] Data)>();
        foreach (var dtype in Enum.GetValues<TensorDType>())
        {
            for (int s = 0; s < Shapes.Length; s++)
            {
                long count = Shapes[s].Aggregate(1L, (a, b) => a * b);
                var data = new byte[count * dtype.Size()];
                random.NextBytes(data);
                tensors.Add(($"{dtype}.{s}", dtype, Shapes[s], data));
            }
        }
        string path = _dir.File("all.safetensors");
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "ünïcode \"quoted\" \n" };
        SafetensorsWriter.WriteFile(path, tensors, metadata);

        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(metadata, reader.Metadata);
        Assert.Equal(tensors.Count, reader.Tensors.Count);
        foreach (var (name, dtype, shape, data) in tensors)
        {
            var info = reader.GetInfo(name);
            Assert.Equal(dtype, info.DType);
            Assert.Equal(shape, info.Shape);
            Assert.Equal(data.LongLength, info.ByteLength);
            Assert.Equal(0, info.DataOffset % dtype.Size());
            Assert.Equal(data, reader.ReadBytes(name));
            Assert.Equal(data, reader.GetSpan(name).ToArray());
            switch (dtype.Size())
            {
                case 1: Assert.Equal(data, reader.Read<byte>(name)); break;
                case 2: Assert.Equal(data, ToBytes(reader.Read<ushort>(name))); break;
                case 4: Assert.Equal(data, ToBytes(reader.Read<uint>(name))); break;
                case 8: Assert.Equal(data, ToBytes(reader.Read<ulong>(name))); break;
            }
        }
    }

    private static byte[] ToBytes<T>(T[] values) where T : unmanaged =>
        System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()).ToArray();

    [Fact]
    public void TypedValuesRoundTrip()
    {
        string path = _dir.File("typed.safetensors");
        double[] d = [1.5, -2.25, double.Epsilon];
        float[] f = [1, 2, 3, 4, 5];
        Half[] h = [(Half)0.5, (Half)(-1)];
        bool[] b = [true, false, true];
        long[] l = [long.MinValue, 0, long.MaxValue];
        SafetensorsWriter.WriteFile(path,
        [
            ("d", TensorDType.F64, [3], ToBytes(d)),
            ("f", TensorDType.F32, [5], ToBytes(f)),
            ("h", TensorDType.F16, [2], ToBytes(h)),
            ("b", TensorDType.BOOL, [3], ToBytes(b)),
            ("l", TensorDType.I64, [3], ToBytes(l)),
        ]);
        using var r = SafetensorsReader.Open(path);
        Assert.Equal(d, r.Read<double>("d"));
        Assert.Equal(f, r.Read<float>("f"));
        Assert.Equal(h, r.Read<Half>("h"));
        Assert.Equal(b, r.Read<bool>("b"));
        Assert.Equal(l, r.Read<long>("l"));
    }

    [Fact]
    public void HeaderIsExactlyTheReferenceFormat()
    {
        string path = _dir.File("one.safetensors");
        var data = new byte[24];
        SafetensorsWriter.WriteFile(path, [("a", TensorDType.F32, [2, 3], data)], new Dictionary<string, string> { ["format"] = "pt" });
        byte[] file = File.ReadAllBytes(path);
        var (n, text, _) = ParseRaw(file);
        const string expected = """{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}""";
        Assert.Equal(0, n % 8);
        Assert.Equal(expected + new string(' ', (int)n - expected.Length), text);
        Assert.Equal(8 + n + 24, file.Length);
    }

    [Fact]
    public void LayoutIsAlignedPackedAndSortedBySizeThenName()
    {
        var random = new Random(7);
        var tensors = new List<(string, TensorDType, long[], byte[])>();
        string[] names = ["zeta", "alpha", "mid", "B", "a.b", "é", "x10", "x9"];
        var dtypes = Enum.GetValues<TensorDType>();
        for (int i = 0; i < 40; i++)
        {
            var dtype = dtypes[random.Next(dtypes.Length)];
            long[] shape = [random.Next(0, 4), random.Next(1, 6)];
            var data = new byte[shape[0] * shape[1] * dtype.Size()];
            random.NextBytes(data);
            tensors.Add(($"{names[i % names.Length]}.{i}", dtype, shape, data));
        }
        string path = _dir.File("layout.safetensors");
        SafetensorsWriter.WriteFile(path, tensors, new Dictionary<string, string> { ["k"] = "v" });

        byte[] file = File.ReadAllBytes(path);
        var (n, text, json) = ParseRaw(file);
        Assert.Equal(0, (8 + n) % 8);
        Assert.StartsWith("{\"__metadata__\":{\"k\":\"v\"},", text);
        Assert.Matches("^ *$", text[(text.LastIndexOf('}') + 1)..]);

        var entries = json.RootElement.EnumerateObject().Where(p => p.Name != "__metadata__").ToList();
        Assert.Equal(tensors.Count, entries.Count);
        long expectedBegin = 0;
        (int Size, byte[] Name)? previous = null;
        foreach (var entry in entries)
        {
            Assert.True(TensorDTypes.TryParse(entry.Value.GetProperty("dtype").GetString()!, out var dtype));
            var offsets = entry.Value.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()).ToArray();
            Assert.Equal(expectedBegin, offsets[0]); // packed: no holes
            Assert.Equal(0, offsets[0] % dtype.Size());
            expectedBegin = offsets[1];
            var key = (dtype.Size(), Encoding.UTF8.GetBytes(entry.Name));
            if (previous is { } p)
            {
                Assert.True(p.Size > key.Item1 || (p.Size == key.Item1 && p.Name.AsSpan().SequenceCompareTo(key.Item2) < 0),
                    $"{entry.Name} is out of order");
            }
            previous = key;
            var source = tensors.Single(t => t.Item1 == entry.Name);
            Assert.Equal(source.Item4, file.AsSpan((int)(8 + n + offsets[0]), (int)(offsets[1] - offsets[0])).ToArray());
        }
        Assert.Equal(file.Length, 8 + n + expectedBegin); // no trailing bytes
    }

    [Fact]
    public void WriteOrderDoesNotChangeTheFile()
    {
        var random = new Random(3);
        var tensors = Enumerable.Range(0, 12).Select(i =>
        {
            var dtype = (TensorDType)(i % Enum.GetValues<TensorDType>().Length);
            var data = new byte[(i + 1) * dtype.Size()];
            random.NextBytes(data);
            return (Name: $"t{i}", DType: dtype, Shape: new long[] { i + 1 }, Data: data);
        }).ToList();
        string a = _dir.File("a.safetensors"), b = _dir.File("b.safetensors");
        using (var w = new SafetensorsWriter(a))
        {
            foreach (var t in tensors) w.Declare(t.Name, t.DType, t.Shape);
            foreach (var t in tensors) w.Write(t.Name, t.Data);
            w.Commit();
        }
        using (var w = new SafetensorsWriter(b))
        {
            foreach (var t in tensors.AsEnumerable().Reverse()) w.Declare(t.Name, t.DType, t.Shape);
            foreach (var t in tensors.OrderBy(_ => random.Next())) w.Write(t.Name, t.Data);
            w.Commit();
        }
        Assert.Equal(File.ReadAllBytes(a), File.ReadAllBytes(b));
    }

    [Fact]
    public void AppendedPartsEqualWholeWrites()
    {
        var random = new Random(11);
        var a = new byte[1000];
        var b = new byte[64];
        random.NextBytes(a);
        random.NextBytes(b);
        string whole = _dir.File("whole.safetensors"), parts = _dir.File("parts.safetensors");
        SafetensorsWriter.WriteFile(whole, [("a", TensorDType.I16, [500], a), ("b", TensorDType.F64, [8], b), ("z", TensorDType.U8, [0], [])]);
        using (var w = new SafetensorsWriter(parts))
        {
            w.Declare("a", TensorDType.I16, [500]);
            w.Declare("b", TensorDType.F64, [8]);
            w.Declare("z", TensorDType.U8, [0]);
            w.Append("a", a.AsSpan(0, 333));
            w.Append("b", b.AsSpan(0, 10));
            w.Append("a", a.AsSpan(333, 0));
            w.Append("a", a.AsSpan(333, 600));
            Assert.Throws<InvalidOperationException>(() => w.Write("a", a));
            Assert.Throws<ArgumentException>(() => w.Append("a", new byte[68]));
            var e = Assert.Throws<InvalidOperationException>(() => w.Commit());
            Assert.Contains("a, b, z", e.Message);
            w.Append("a", a.AsSpan(933));
            w.Append("b", b.AsSpan(10));
            w.Append("z", []);
            Assert.Throws<InvalidOperationException>(() => w.Append("a", []));
            w.Commit();
        }
        Assert.Equal(File.ReadAllBytes(whole), File.ReadAllBytes(parts));
    }

    [Fact]
    public void WritingAllocatesIndependentlyOfTheFileSize()
    {
        string path = _dir.File("big.safetensors");
        var chunk = new byte[1 << 20];
        new Random(2).NextBytes(chunk);
        using var w = new SafetensorsWriter(path);
        w.Declare("a", TensorDType.F32, [8 << 20]);
        w.Declare("b", TensorDType.BF16, [4 << 20]);
        w.Append("a", chunk); // warm up: opens the file and writes the header
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 1; i < 32; i++) w.Append("a", chunk);
        for (int i = 0; i < 8; i++) w.Append("b", chunk);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        w.Commit();
        Assert.True(allocated < 256 * 1024, $"{allocated} bytes allocated while writing 40 MB");
        Assert.InRange(new FileInfo(path).Length - 40L * (1 << 20), 8, 256);
    }

    [Fact]
    public void EmptyFilesAreValid()
    {
        string path = _dir.File("empty.safetensors");
        using (var w = new SafetensorsWriter(path)) w.Commit();
        Assert.Equal("{}      ", ParseRaw(File.ReadAllBytes(path)).HeaderText);
        using var r = SafetensorsReader.Open(path);
        Assert.Empty(r.Tensors);
    }

    [Fact]
    public void MisuseIsRejected()
    {
        string path = _dir.File("misuse.safetensors");
        using var w = new SafetensorsWriter(path);
        w.Declare("a", TensorDType.F32, [2]);
        Assert.Throws<ArgumentException>(() => w.Declare("a", TensorDType.U8, [1]));
        Assert.Throws<ArgumentException>(() => w.Declare("__metadata__", TensorDType.U8, [1]));
        Assert.Throws<ArgumentException>(() => w.Declare("neg", TensorDType.U8, [-1]));
        Assert.Throws<ArgumentException>(() => w.Declare("huge", TensorDType.F64, [long.MaxValue / 4, 4]));
        Assert.Throws<ArgumentException>(() => w.Declare("\ud800", TensorDType.U8, [1]));
        Assert.Throws<ArgumentOutOfRangeException>(() => w.Declare("bad", (TensorDType)99, [1]));
        w.Declare("b", TensorDType.U8, [3]);
        Assert.Throws<ArgumentException>(() => w.Write("nope", new byte[1]));
        Assert.Throws<ArgumentException>(() => w.Write("a", new byte[7]));
        w.Write("a", new byte[8]);
        Assert.Throws<InvalidOperationException>(() => w.Write("a", new byte[8]));
        Assert.Throws<InvalidOperationException>(() => w.Declare("c", TensorDType.U8, [1]));
        var e = Assert.Throws<InvalidOperationException>(() => w.Commit());
        Assert.Contains("b", e.Message);
        w.Write("b", new byte[3]);
        w.Commit();
        Assert.Throws<InvalidOperationException>(() => w.Write("b", new byte[3]));
        Assert.Throws<ArgumentException>(() => new SafetensorsWriter(_dir.File("x"), new Dictionary<string, string> { ["k"] = null! }));
    }

    [Fact]
    public void DisposeWithoutCommitLeavesExistingFileAndNoTempFile()
    {
        string path = _dir.File("model.safetensors");
        SafetensorsWriter.WriteFile(path, [("old", TensorDType.U8, [2], [1, 2])]);
        byte[] before = File.ReadAllBytes(path);

        using (var w = new SafetensorsWriter(path))
        {
            w.Declare("new", TensorDType.F32, [1000]);
            w.Declare("other", TensorDType.U8, [1]);
            w.Write("new", new byte[4000]);
            Assert.Single(Directory.GetFiles(_dir.Path, "*.qlora-tmp", SearchOption.AllDirectories));
        }
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Equal([path], Directory.GetFiles(_dir.Path));

        // A failing commit (a tensor never written) also leaves the old file and no debris.
        var failing = new SafetensorsWriter(path);
        failing.Declare("x", TensorDType.U8, [1]);
        Assert.Throws<InvalidOperationException>(() => failing.Commit());
        failing.Dispose();
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Equal([path], Directory.GetFiles(_dir.Path));
    }

    [Fact]
    public void FailedRenameLeavesNoTempFileAndRefusesToContinue()
    {
        string path = _dir.File("occupied");
        Directory.CreateDirectory(path); // a folder where the file should go: the rename fails
        var w = new SafetensorsWriter(path);
        w.Declare("a", TensorDType.U8, [1]);
        w.Write("a", [1]);
        Assert.ThrowsAny<IOException>(() => w.Commit());
        Assert.Throws<InvalidOperationException>(() => w.Commit());
        w.Dispose();
        Assert.Equal([path], Directory.GetFileSystemEntries(_dir.Path));
        Assert.Empty(Directory.GetFileSystemEntries(path));
    }

    [Fact]
    public void CommitReplacesExistingFile()
    {
        string path = _dir.File("model.safetensors");
        SafetensorsWriter.WriteFile(path, [("old", TensorDType.U8, [2], [1, 2])]);
        SafetensorsWriter.WriteFile(path, [("new", TensorDType.U8, [1], [3])]);
        using var r = SafetensorsReader.Open(path);
        Assert.Equal(["new"], r.Tensors.Select(t => t.Name));
        Assert.Equal([path], Directory.GetFiles(_dir.Path));
    }

    [Fact]
    public void NamesNeedingEscapesRoundTrip()
    {
        string path = _dir.File("names.safetensors");
        string[] names = ["quote\"", "back\\slash", "new\nline", "ünï", "😀", "<&>", "", "tab\t", "\uFF01"];
        SafetensorsWriter.WriteFile(path, names.Select((n, i) => (n, TensorDType.U8, new long[] { 1 }, new[] { (byte)i })));
        using var r = SafetensorsReader.Open(path);
        for (int i = 0; i < names.Length; i++) Assert.Equal([(byte)i], r.ReadBytes(names[i]));
        using var json = ParseRaw(File.ReadAllBytes(path)).Json;
        // Same element size: sorted by UTF-8 bytes, where U+FF01 comes before U+1F600 (UTF-16 ordinal says the opposite).
        var utf8Order = names.OrderBy(n => Encoding.UTF8.GetBytes(n), Comparer<byte[]>.Create((x, y) => x.AsSpan().SequenceCompareTo(y))).ToList();
        Assert.True(utf8Order.IndexOf("\uFF01") < utf8Order.IndexOf("😀"));
        Assert.Equal(utf8Order, json.RootElement.EnumerateObject().Select(p => p.Name));
    }
}
