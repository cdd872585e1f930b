using System.Buffers.Binary;
using System.Text;
using System.Text.Json;

namespace QLora.Quant.Tests;

public sealed class SafetensorsCheckpointTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    private static List<(string Name, TensorDType DType, long[] Shape, byte[] Data)> Tensors(int count, int seed = 5)
    {
        var random = new Random(seed);
        var dtypes = Enum.GetValues<TensorDType>();
        return Enumerable.Range(0, count).Select(i =>
        {
            var dtype = dtypes[i % dtypes.Length];
            long[] shape = [random.Next(1, 9), random.Next(1, 9)];
            var data = new byte[shape[0] * shape[1] * dtype.Size()];
            random.NextBytes(data);
            return ($"model.layers.{i}.weight", dtype, shape, data);
        }).ToList();
    }

    /// Tensor names of a shard, parsed from its raw header without the reader.
    private static List<string> RawNames(string file)
    {
        byte[] bytes = File.ReadAllBytes(file);
        int n = (int)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        using var json = JsonDocument.Parse(Encoding.UTF8.GetString(bytes, 8, n));
        return json.RootElement.EnumerateObject().Select(p => p.Name).Where(p => p != "__metadata__").ToList();
    }

    [Fact]
    public void ShardedRoundTrip()
    {
        var tensors = Tensors(20);
        long total = tensors.Sum(t => t.Data.LongLength);
        const long max = 300;
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors, max, new Dictionary<string, string> { ["format"] = "pt" });

        string indexPath = _dir.File("model.safetensors.index.json");
        string text = File.ReadAllText(indexPath);
        using var index = JsonDocument.Parse(text);
        var shardFiles = Directory.GetFiles(_dir.Path, "*.safetensors").Select(f => Path.GetFileName(f)).Order().ToList();
        int k = shardFiles.Count;
        Assert.True(k > 2);
        Assert.Equal(Enumerable.Range(1, k).Select(i => $"model-{i:D5}-of-{k:D5}.safetensors"), shardFiles);
        Assert.DoesNotContain(_dir.File("model.safetensors"), Directory.GetFiles(_dir.Path));

        Assert.StartsWith($"{{\n  \"metadata\": {{\n    \"total_size\": {total}\n  }},\n  \"weight_map\": {{\n    \"", text);
        Assert.EndsWith("\"\n  }\n}\n", text);
        Assert.Equal(total, index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64());
        var weightMap = index.RootElement.GetProperty("weight_map").EnumerateObject().Select(p => (p.Name, File: p.Value.GetString()!)).ToList();
        Assert.Equal(tensors.Select(t => t.Name).Order(StringComparer.Ordinal), weightMap.Select(p => p.Name));

        // Each shard holds exactly the tensors the map assigns it, within the size limit, split in declaration order.
        var order = new List<string>();
        foreach (string file in shardFiles)
        {
            var names = RawNames(_dir.File(file));
            Assert.Equal(weightMap.Where(p => p.File == file).Select(p => p.Name).Order(), names.Order());
            Assert.True(names.Count == 1 || names.Sum(n => tensors.Single(t => t.Name == n).Data.LongLength) <= max);
            order.AddRange(tensors.Where(t => names.Contains(t.Name)).Select(t => t.Name));
        }
        Assert.Equal(tensors.Select(t => t.Name), order);

        foreach (string open in new[] { _dir.Path, indexPath })
        {
            using var checkpoint = SafetensorsCheckpoint.Open(open);
            Assert.Equal(indexPath, checkpoint.IndexPath, ignoreCase: false);
            Assert.Equal(k, checkpoint.Shards.Count);
            Assert.Equal(total.ToString(), checkpoint.IndexMetadata["total_size"]);
            Assert.Equal("pt", checkpoint.Metadata["format"]);
            Assert.Equal(tensors.Count, checkpoint.Tensors.Count);
            foreach (var t in tensors)
            {
                Assert.True(checkpoint.Contains(t.Name));
                Assert.Equal(t.DType, checkpoint.GetInfo(t.Name).DType);
                Assert.Equal(t.Shape, checkpoint.GetInfo(t.Name).Shape);
                Assert.Equal(t.Data, checkpoint.ReadBytes(t.Name));
                Assert.Equal(t.Data, checkpoint.GetSpan(t.Name).ToArray());
                var into = new byte[t.Data.Length];
                checkpoint.ReadInto(t.Name, into);
                Assert.Equal(t.Data, into);
                Assert.Equal(checkpoint.GetShard(t.Name).GetPointer(t.Name), checkpoint.GetPointer(t.Name));
                Assert.Equal(weightMap.Single(p => p.Name == t.Name).File, Path.GetFileName(checkpoint.GetShard(t.Name).Path));
            }
            Assert.Equal(tensors[9].Data, System.Runtime.InteropServices.MemoryMarshal.AsBytes(checkpoint.Read<float>(tensors[9].Name).AsSpan()).ToArray());
            var e = Assert.Throws<KeyNotFoundException>(() => checkpoint.GetInfo("lm_head.weight"));
            Assert.Contains("lm_head.weight", e.Message);
        }
    }

    [Fact]
    public void OneShardIsASingleFileWithoutIndex()
    {
        var tensors = Tensors(5);
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors);
        Assert.Equal([_dir.File("model.safetensors")], Directory.GetFiles(_dir.Path));
        using var checkpoint = SafetensorsCheckpoint.Open(_dir.Path);
        Assert.Null(checkpoint.IndexPath);
        Assert.Single(checkpoint.Shards);
        foreach (var t in tensors) Assert.Equal(t.Data, checkpoint.ReadBytes(t.Name));
        using var direct = SafetensorsCheckpoint.Open(_dir.File("model.safetensors"));
        Assert.Equal(tensors.Count, direct.Tensors.Count);
    }

    [Fact]
    public void OversizedTensorGetsItsOwnShard()
    {
        var tensors = new List<(string, TensorDType, long[], byte[])>
        {
            ("a", TensorDType.U8, [10], new byte[10]),
            ("big", TensorDType.F32, [100], new byte[400]),
            ("b", TensorDType.U8, [10], new byte[10]),
            ("c", TensorDType.U8, [0], []),
        };
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors, maxShardBytes: 50);
        Assert.Equal(["a"], RawNames(_dir.File("model-00001-of-00003.safetensors")));
        Assert.Equal(["big"], RawNames(_dir.File("model-00002-of-00003.safetensors")));
        Assert.Equal(["b", "c"], RawNames(_dir.File("model-00003-of-00003.safetensors")));
    }

    [Fact]
    public void ResavingRemovesStaleFilesOfTheEarlierLayout()
    {
        var tensors = Tensors(12);
        File.WriteAllText(_dir.File("config.json"), "{}");
        File.WriteAllText(_dir.File("other-00001-of-00002.safetensors"), "");
        File.WriteAllText(_dir.File("model-1-of-2.safetensors"), "");
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors, maxShardBytes: 200);
        Assert.True(File.Exists(_dir.File("model.safetensors.index.json")));
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors, maxShardBytes: 400);
        var files = Directory.GetFiles(_dir.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList();
        int k = files.Count - 4;
        string[] expected = [.. new[] { "config.json", "model-1-of-2.safetensors" }, .. Enumerable.Range(1, k).Select(i => $"model-{i:D5}-of-{k:D5}.safetensors"), "model.safetensors.index.json", "other-00001-of-00002.safetensors"];
        Assert.Equal(expected.Order(StringComparer.Ordinal), files);
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors);
        Assert.Equal(["config.json", "model-1-of-2.safetensors", "model.safetensors", "other-00001-of-00002.safetensors"], Directory.GetFiles(_dir.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors, maxShardBytes: 200);
        Assert.False(File.Exists(_dir.File("model.safetensors")));
        using var checkpoint = SafetensorsCheckpoint.Open(_dir.Path);
        foreach (var t in tensors) Assert.Equal(t.Data, checkpoint.ReadBytes(t.Name));
    }

    [Fact]
    public void BaseNameNamesTheFiles()
    {
        var tensors = Tensors(6);
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors, baseName: "adapter_model");
        Assert.Equal([_dir.File("adapter_model.safetensors")], Directory.GetFiles(_dir.Path));
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors, maxShardBytes: 100, baseName: "adapter_model");
        Assert.True(File.Exists(_dir.File("adapter_model.safetensors.index.json")));
        Assert.Single(Directory.GetFiles(_dir.Path, "adapter_model-00001-of-000*.safetensors"));
        Assert.False(File.Exists(_dir.File("adapter_model.safetensors")));
        using var checkpoint = SafetensorsCheckpoint.Open(_dir.File("adapter_model.safetensors.index.json"));
        foreach (var t in tensors) Assert.Equal(t.Data, checkpoint.ReadBytes(t.Name));
    }

    [Fact]
    public void UncommittedShardedWriterLeavesNoDebris()
    {
        var tensors = Tensors(8);
        ShardedSafetensorsWriter.WriteCheckpoint(_dir.Path, tensors, maxShardBytes: 200);
        var before = Directory.GetFiles(_dir.Path).Order().Select(f => f + ":" + Convert.ToBase64String(File.ReadAllBytes(f))).ToList();
        using (var w = new ShardedSafetensorsWriter(_dir.Path, 100))
        {
            foreach (var t in tensors) w.Declare(t.Name, t.DType, t.Shape);
            foreach (var t in tensors.Skip(1)) w.Write(t.Name, t.Data);
            Assert.Throws<InvalidOperationException>(() => w.Commit());
        }
        Assert.Equal(before, Directory.GetFiles(_dir.Path).Order().Select(f => f + ":" + Convert.ToBase64String(File.ReadAllBytes(f))).ToList());
    }

    private string WriteShard(string file, params string[] names)
    {
        var w = new SafetensorsWriter(_dir.File(file));
        foreach (string n in names) w.Declare(n, TensorDType.U8, [1]);
        foreach (string n in names) w.Write(n, [1]);
        w.Commit();
        return file;
    }

    private SafetensorsFormatException BadIndex(string json, string expected)
    {
        string index = _dir.File("model.safetensors.index.json");
        File.WriteAllText(index, json);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(_dir.Path).Dispose());
        Assert.Equal(index, e.FilePath);
        Assert.Contains(expected, e.Problem);
        return e;
    }

    [Fact]
    public void HandWrittenIndexWithUnmappedTensorOpens()
    {
        WriteShard("s1.safetensors", "a", "b");
        WriteShard("s2.safetensors", "c", "extra");
        File.WriteAllText(_dir.File("model.safetensors.index.json"),
            """{"metadata": {"total_size": 3, "format": "pt", "nested": {"x": [1]}}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}, "other": 1}""");
        using var checkpoint = SafetensorsCheckpoint.Open(_dir.Path);
        Assert.Equal(["a", "b", "c", "extra"], checkpoint.Tensors.Select(t => t.Name));
        Assert.Equal("3", checkpoint.IndexMetadata["total_size"]);
        Assert.Equal("pt", checkpoint.IndexMetadata["format"]);
        Assert.Equal([1], checkpoint.ReadBytes("extra"));
    }

    [Fact]
    public void MissingShardFile()
    {
        WriteShard("s1.safetensors", "a");
        var e = BadIndex("""{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}""", "does not exist");
        Assert.Contains("s2.safetensors", e.Problem);
    }

    [Fact]
    public void MappedTensorNotInItsShard()
    {
        WriteShard("s1.safetensors", "a");
        WriteShard("s2.safetensors", "b");
        var e = BadIndex("""{"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}""", "does not contain it");
        Assert.Contains("'a'", e.Problem);
    }

    [Fact]
    public void TensorInTwoShards()
    {
        WriteShard("s1.safetensors", "a", "b");
        WriteShard("s2.safetensors", "b");
        BadIndex("""{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}""", "in two shards");
    }

    [Theory]
    [InlineData("""{"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}}""", "appears twice")]
    [InlineData("""{"weight_map": {"a": "../s1.safetensors"}}""", "not a plain file name")]
    [InlineData("""{"weight_map": {"a": "/etc/passwd"}}""", "not a plain file name")]
    [InlineData("""{"weight_map": {"a": ""}}""", "not a plain file name")]
    [InlineData("""{"weight_map": {"a": 1}}""", "not a file name string")]
    [InlineData("""{"weight_map": []}""", "not an object")]
    [InlineData("""{"metadata": [], "weight_map": {}}""", "not an object")]
    [InlineData("""{"metadata": {}}""", "no 'weight_map'")]
    [InlineData("""[]""", "not a JSON object")]
    [InlineData("""{"weight_map": {"a": "s1.safetensors"}""", "not valid JSON")]
    [InlineData("", "not valid JSON")]
    [InlineData("""{"weight_map": {"\ud800": "s1.safetensors"}}""", "invalid string")]
    public void MalformedIndex(string json, string expected)
    {
        WriteShard("s1.safetensors", "a");
        BadIndex(json, expected);
    }

    [Fact]
    public void MalformedShardIsReportedWithItsOwnPath()
    {
        File.WriteAllBytes(_dir.File("s1.safetensors"), [1, 2, 3]);
        File.WriteAllText(_dir.File("model.safetensors.index.json"), """{"weight_map": {"a": "s1.safetensors"}}""");
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(_dir.Path));
        Assert.EndsWith("s1.safetensors", e.FilePath);
    }

    [Fact]
    public void FolderWithoutCheckpoint()
    {
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.Open(_dir.Path));
        Assert.Contains("neither", e.Problem);
    }
}
