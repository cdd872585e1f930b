using System.Text.Json;

namespace QLora.Quant;

/// <summary>
/// A model checkpoint stored as one safetensors file or as shards listed in a <c>model.safetensors.index.json</c>
/// (Hugging Face layout), looked up by tensor name as if it were one file. Every shard is opened (memory-mapped and
/// validated) up front; the index is validated against them: every listed file exists, every mapped tensor is in the
/// shard it is mapped to, no tensor is in two shards. Tensors present in a shard but missing from the weight map are
/// still served, as transformers loads them too.
/// </summary>
public sealed class SafetensorsCheckpoint : ITensorSource, IDisposable
{
    /// <summary>File name of a single-file checkpoint.</summary>
    public const string SingleFileName = "model.safetensors";

    /// <summary>File name of the index of a sharded checkpoint.</summary>
    public const string IndexFileName = "model.safetensors.index.json";

    private readonly List<SafetensorsReader> _shards;
    private readonly Dictionary<string, SafetensorsReader> _owner;
    private readonly List<TensorInfo> _tensors;

    private SafetensorsCheckpoint(string path, string? indexPath, List<SafetensorsReader> shards,
        Dictionary<string, SafetensorsReader> owner, List<TensorInfo> tensors, IReadOnlyDictionary<string, string> indexMetadata)
    {
        Path = path;
        IndexPath = indexPath;
        _shards = shards;
        _owner = owner;
        _tensors = tensors;
        IndexMetadata = indexMetadata;
        Metadata = shards.Count > 0 ? shards[0].Metadata : new Dictionary<string, string>();
    }

    /// <summary>
    /// Opens <paramref name="path"/>: a <c>.safetensors</c> file, an index <c>.json</c> file, or a folder holding
    /// <c>model.safetensors</c> (preferred, as transformers does) or <c>model.safetensors.index.json</c>.
    /// </summary>
    /// <exception cref="SafetensorsFormatException">A file is malformed or the index disagrees with its shards.</exception>
    public static SafetensorsCheckpoint Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (Directory.Exists(path))
        {
            string single = System.IO.Path.Combine(path, SingleFileName);
            if (File.Exists(single)) return OpenSingle(path, single);
            string index = System.IO.Path.Combine(path, IndexFileName);
            if (File.Exists(index)) return OpenIndex(path, index);
            throw new SafetensorsFormatException(path, $"folder holds neither {SingleFileName} nor {IndexFileName}");
        }
        return path.EndsWith(".json", StringComparison.OrdinalIgnoreCase) ? OpenIndex(path, path) : OpenSingle(path, path);
    }

    /// <summary>What was opened: a file, an index file or a folder.</summary>
    public string Path { get; }

    /// <summary>The index file of a sharded checkpoint; null for a single file.</summary>
    public string? IndexPath { get; }

    /// <summary>The open shard files (one for a single-file checkpoint), in file-name order.</summary>
    public IReadOnlyList<SafetensorsReader> Shards => _shards;

    /// <summary>The <c>__metadata__</c> of the first shard (writers put the same entries, e.g. <c>format: pt</c>, in every shard).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>The index's <c>metadata</c> object: string values as they are, other values as their JSON text (e.g. <c>total_size</c>); empty for a single file.</summary>
    public IReadOnlyDictionary<string, string> IndexMetadata { get; }

    /// <summary>Every tensor: shard by shard in file-name order, header order within a shard.</summary>
    public IReadOnlyList<TensorInfo> Tensors => _tensors;

    /// <summary>True when some shard holds a tensor named <paramref name="name"/>.</summary>
    public bool Contains(string name) => _owner.ContainsKey(name);

    /// <summary>The shard holding a tensor; its <see cref="TensorInfo.DataOffset"/> counts from the start of that file.</summary>
    public SafetensorsReader GetShard(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _owner.TryGetValue(name, out var shard)
            ? shard
            : throw new KeyNotFoundException($"{IndexPath ?? Path}: no tensor named '{name}'");
    }

    /// <summary>Looks up a tensor; throws <see cref="KeyNotFoundException"/> naming the checkpoint and the tensor when it is absent.</summary>
    public TensorInfo GetInfo(string name) => GetShard(name).GetInfo(name);

    /// <summary>Zero-copy view of a tensor's bytes; see <see cref="SafetensorsReader.GetSpan(string)"/>.</summary>
    public ReadOnlySpan<byte> GetSpan(string name) => GetShard(name).GetSpan(name);

    /// <summary>Zero-copy view of part of a tensor; see <see cref="SafetensorsReader.GetSpan(string, long, int)"/>.</summary>
    public ReadOnlySpan<byte> GetSpan(string name, long offset, int length) => GetShard(name).GetSpan(name, offset, length);

    /// <summary>Address of a tensor's first byte in its shard's memory map; see <see cref="SafetensorsReader.GetPointer"/>.</summary>
    public nint GetPointer(string name) => GetShard(name).GetPointer(name);

    /// <summary>Copies a tensor's bytes into <paramref name="destination"/>; see <see cref="SafetensorsReader.ReadInto"/>.</summary>
    public void ReadInto(string name, Span<byte> destination) => GetShard(name).ReadInto(name, destination);

    /// <summary>Copies a tensor's bytes into a new array.</summary>
    public byte[] ReadBytes(string name) => GetShard(name).ReadBytes(name);

    /// <summary>Copies a tensor into a new array of <typeparamref name="T"/>; see <see cref="SafetensorsReader.Read{T}"/>.</summary>
    public T[] Read<T>(string name) where T : unmanaged => GetShard(name).Read<T>(name);

    /// <summary>Unmaps every shard.</summary>
    public void Dispose()
    {
        foreach (var shard in _shards) shard.Dispose();
    }

    private static SafetensorsCheckpoint OpenSingle(string path, string file)
    {
        var reader = SafetensorsReader.Open(file);
        var owner = reader.Tensors.ToDictionary(t => t.Name, _ => reader, StringComparer.Ordinal);
        return new SafetensorsCheckpoint(path, null, [reader], owner, [.. reader.Tensors], new Dictionary<string, string>());
    }

    private static SafetensorsCheckpoint OpenIndex(string path, string indexPath)
    {
        var (metadata, weightMap) = ReadIndex(indexPath);
        string folder = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(indexPath))!;
        var files = weightMap.Values.Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal).ToList();
        foreach (string file in files)
        {
            if (!File.Exists(System.IO.Path.Combine(folder, file)))
                throw new SafetensorsFormatException(indexPath, $"shard '{file}' listed in weight_map does not exist");
        }

        var shards = new List<SafetensorsReader>();
        try
        {
            var byFile = new Dictionary<string, SafetensorsReader>(StringComparer.Ordinal);
            foreach (string file in files)
            {
                var shard = SafetensorsReader.Open(System.IO.Path.Combine(folder, file));
                shards.Add(shard);
                byFile.Add(file, shard);
            }
            var owner = new Dictionary<string, SafetensorsReader>(StringComparer.Ordinal);
            var tensors = new List<TensorInfo>();
            for (int i = 0; i < shards.Count; i++)
            {
                foreach (var t in shards[i].Tensors)
                {
                    if (owner.TryGetValue(t.Name, out var other))
                        throw new SafetensorsFormatException(indexPath, $"tensor '{t.Name}' is in two shards: '{System.IO.Path.GetFileName(other.Path)}' and '{files[i]}'");
                    owner.Add(t.Name, shards[i]);
                    tensors.Add(t);
                }
            }
            foreach (var (tensor, file) in weightMap)
            {
                if (!byFile[file].Contains(tensor))
                    throw new SafetensorsFormatException(indexPath, $"tensor '{tensor}' is mapped to shard '{file}', which does not contain it");
            }
            return new SafetensorsCheckpoint(path, indexPath, shards, owner, tensors, metadata);
        }
        catch
        {
            foreach (var shard in shards) shard.Dispose();
            throw;
        }
    }

    /// <summary>Parses and validates an index file: a JSON object with an optional <c>metadata</c> object and a <c>weight_map</c> of tensor name to shard file name.</summary>
    internal static (Dictionary<string, string> Metadata, Dictionary<string, string> WeightMap) ReadIndex(string indexPath)
    {
        long length = new FileInfo(indexPath).Length;
        if (length > SafetensorsHeader.MaxHeaderBytes)
            throw new SafetensorsFormatException(indexPath, $"index of {length} bytes exceeds the {SafetensorsHeader.MaxHeaderBytes}-byte limit");
        byte[] bytes = File.ReadAllBytes(indexPath);
        if (!System.Text.Unicode.Utf8.IsValid(bytes)) throw new SafetensorsFormatException(indexPath, "index is not valid UTF-8");
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(bytes, new JsonDocumentOptions { MaxDepth = 64 });
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException(indexPath, $"index is not valid JSON: {e.Message}", e);
        }
        using (document)
        try
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new SafetensorsFormatException(indexPath, "index is not a JSON object");
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
            bool sawMap = false, sawMetadata = false;
            foreach (var property in root.EnumerateObject())
            {
                if (property.Name == "metadata")
                {
                    if (sawMetadata) throw new SafetensorsFormatException(indexPath, "duplicate key 'metadata'");
                    sawMetadata = true;
                    if (property.Value.ValueKind == JsonValueKind.Null) continue;
                    if (property.Value.ValueKind != JsonValueKind.Object) throw new SafetensorsFormatException(indexPath, "'metadata' is not an object");
                    foreach (var entry in property.Value.EnumerateObject())
                    {
                        string value = entry.Value.ValueKind == JsonValueKind.String ? entry.Value.GetString()! : entry.Value.GetRawText();
                        if (!metadata.TryAdd(entry.Name, value)) throw new SafetensorsFormatException(indexPath, $"duplicate metadata key '{entry.Name}'");
                    }
                }
                else if (property.Name == "weight_map")
                {
                    if (sawMap) throw new SafetensorsFormatException(indexPath, "duplicate key 'weight_map'");
                    sawMap = true;
                    if (property.Value.ValueKind != JsonValueKind.Object) throw new SafetensorsFormatException(indexPath, "'weight_map' is not an object");
                    foreach (var entry in property.Value.EnumerateObject())
                    {
                        if (entry.Value.ValueKind != JsonValueKind.String)
                            throw new SafetensorsFormatException(indexPath, $"weight_map entry '{entry.Name}' is not a file name string");
                        string file = entry.Value.GetString()!;
                        if (!IsPlainFileName(file))
                            throw new SafetensorsFormatException(indexPath, $"weight_map entry '{entry.Name}' names '{file}', which is not a plain file name in the index's folder");
                        if (!weightMap.TryAdd(entry.Name, file))
                            throw new SafetensorsFormatException(indexPath, $"tensor '{entry.Name}' appears twice in weight_map");
                    }
                }
            }
            if (!sawMap) throw new SafetensorsFormatException(indexPath, "index has no 'weight_map'");
            return (metadata, weightMap);
        }
        catch (InvalidOperationException e)
        {
            throw new SafetensorsFormatException(indexPath, $"index has an invalid string: {e.Message}", e);
        }
    }

    private static bool IsPlainFileName(string file) =>
        file.Length > 0 && file != "." && file != ".." && file.IndexOfAny(['/', '\\', '\0', ':']) < 0
        && file.IndexOfAny(System.IO.Path.GetInvalidFileNameChars()) < 0;
}
