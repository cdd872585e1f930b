using System.Buffers;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace QLora.Quant;

/// <summary>
/// Writes a checkpoint split into safetensors shards of at most <see cref="MaxShardBytes"/> tensor bytes each, named
/// <c>model-00001-of-0000K.safetensors</c>, plus <c>model.safetensors.index.json</c> (Hugging Face layout); a single
/// <c>model.safetensors</c> and no index when one shard suffices. Tensors are assigned to shards in declaration order
/// (a tensor larger than the limit gets a shard of its own). Each file is written atomically (temporary file, then
/// rename); the index is written last. After a successful commit, files of an earlier save under the same base name
/// that the new checkpoint does not use (old shards, a stale index or single file) are deleted so the folder opens
/// as exactly this checkpoint.
/// </summary>
public sealed class ShardedSafetensorsWriter : IDisposable
{
    /// <summary>transformers' default shard limit, "5GB".</summary>
    public const long DefaultMaxShardBytes = 5_000_000_000;

    private readonly string _directory;
    private readonly string _baseName;
    private readonly IReadOnlyDictionary<string, string>? _metadata;
    private readonly List<(string Name, TensorDType DType, long[] Shape, long Bytes)> _declared = [];
    private readonly HashSet<string> _names = new(StringComparer.Ordinal);
    private readonly Dictionary<string, SafetensorsWriter> _writerOf = new(StringComparer.Ordinal);
    private List<SafetensorsWriter>? _shards;
    private bool _committed;
    private bool _disposed;

    /// <summary>
    /// Starts a checkpoint in <paramref name="directory"/> (created if missing). <paramref name="metadata"/> goes into
    /// every shard's <c>__metadata__</c> (transformers writes <c>format: pt</c>); <paramref name="baseName"/> replaces
    /// <c>model</c> in the file names.
    /// </summary>
    public ShardedSafetensorsWriter(string directory, long maxShardBytes = DefaultMaxShardBytes,
        IReadOnlyDictionary<string, string>? metadata = null, string baseName = "model")
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxShardBytes);
        ArgumentException.ThrowIfNullOrEmpty(baseName);
        if (baseName.IndexOfAny(['/', '\\']) >= 0 || baseName.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0)
            throw new ArgumentException("base name must be a plain file name", nameof(baseName));
        SafetensorsWriter.CheckMetadata(metadata);
        _directory = Path.GetFullPath(directory);
        MaxShardBytes = maxShardBytes;
        _metadata = metadata is null ? null : new Dictionary<string, string>(metadata, StringComparer.Ordinal);
        _baseName = baseName;
    }

    /// <summary>Largest number of tensor bytes per shard (headers not counted), unless a single tensor is larger.</summary>
    public long MaxShardBytes { get; }

    /// <summary>Sum of the declared tensors' bytes: the index's <c>metadata.total_size</c>.</summary>
    public long TotalSize { get; private set; }

    /// <summary>File name of the index written when there is more than one shard.</summary>
    public string IndexFileName => $"{_baseName}.safetensors.index.json";

    /// <summary>File names of the shards, known once the first <see cref="Write"/> (or <see cref="Commit"/>) fixed the split.</summary>
    public IReadOnlyList<string> ShardFiles => _shards?.Select(s => Path.GetFileName(s.Path)).ToList() ?? [];

    /// <summary>Declares a tensor; declare all of them, in the order they should be split, before the first <see cref="Write"/>.</summary>
    public void Declare(string name, TensorDType dtype, long[] shape)
    {
        ThrowIfClosed();
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(shape);
        if (_shards is not null) throw new InvalidOperationException($"{_directory}: cannot declare '{name}' after the first Write fixed the shards");
        if (_names.Contains(name)) throw new ArgumentException($"tensor '{name}' is already declared", nameof(name));
        long bytes = SafetensorsWriter.CheckDeclaration(name, dtype, shape);
        try { TotalSize = checked(TotalSize + bytes); }
        catch (OverflowException) { throw new ArgumentException($"tensor '{name}' makes the checkpoint too large", nameof(shape)); }
        _names.Add(name);
        _declared.Add((name, dtype, (long[])shape.Clone(), bytes));
    }

    /// <summary>Writes a declared tensor's bytes, in any order, once each; the first call fixes the split into shards.</summary>
    public void Write(string name, ReadOnlySpan<byte> data)
    {
        ThrowIfClosed();
        ArgumentNullException.ThrowIfNull(name);
        EnsureShards();
        if (!_writerOf.TryGetValue(name, out var writer)) throw new ArgumentException($"{_directory}: tensor '{name}' was not declared", nameof(name));
        writer.Write(name, data);
    }

    /// <summary>Appends the next part of a declared tensor's bytes; see <see cref="SafetensorsWriter.Append"/>.</summary>
    public void Append(string name, ReadOnlySpan<byte> chunk)
    {
        ThrowIfClosed();
        ArgumentNullException.ThrowIfNull(name);
        EnsureShards();
        if (!_writerOf.TryGetValue(name, out var writer)) throw new ArgumentException($"{_directory}: tensor '{name}' was not declared", nameof(name));
        writer.Append(name, chunk);
    }

    /// <summary>
    /// Commits every shard (checking first that each declared tensor was written), then writes the index atomically,
    /// then removes stale files of an earlier save under the same base name. Should an I/O error stop it part way,
    /// shards already renamed stay in place and the old index (if any) is still the one on disk.
    /// </summary>
    public void Commit()
    {
        ThrowIfClosed();
        EnsureShards();
        var missing = _declared.Where(t => !_writerOf[t.Name].IsWritten(t.Name)).Select(t => t.Name).ToList();
        if (missing.Count > 0)
            throw new InvalidOperationException($"{_directory}: {missing.Count} declared tensor(s) not written: {string.Join(", ", missing.Take(5))}{(missing.Count > 5 ? ", ..." : "")}");
        foreach (var shard in _shards!) shard.Commit();
        var kept = new HashSet<string>(ShardFiles, StringComparer.Ordinal);
        if (_shards.Count > 1)
        {
            AtomicFile.WriteAllBytes(Path.Combine(_directory, IndexFileName), BuildIndex());
            kept.Add(IndexFileName);
        }
        _committed = true;
        RemoveStaleFiles(kept);
    }

    /// <summary>
    /// Writes a whole checkpoint in one call (tensors enumerated once into a list, split in their order).
    /// </summary>
    public static void WriteCheckpoint(string directory, IEnumerable<(string Name, TensorDType DType, long[] Shape, byte[] Data)> tensors,
        long maxShardBytes = DefaultMaxShardBytes, IReadOnlyDictionary<string, string>? metadata = null, string baseName = "model")
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var list = tensors.ToList();
        using var writer = new ShardedSafetensorsWriter(directory, maxShardBytes, metadata, baseName);
        foreach (var t in list) writer.Declare(t.Name, t.DType, t.Shape);
        foreach (var t in list) writer.Write(t.Name, t.Data);
        writer.Commit();
    }

    /// <summary>Deletes every uncommitted temporary file; files already in place are left as they are.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (_shards is null) return;
        foreach (var shard in _shards) shard.Dispose();
    }

    /// <summary>The index text as transformers writes it: <c>json.dumps(index, indent=2, sort_keys=True) + "\n"</c>.</summary>
    internal byte[] BuildIndex()
    {
        var buffer = new ArrayBufferWriter<byte>();
        var options = new JsonWriterOptions { Indented = true, IndentSize = 2, NewLine = "\n", Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
        using (var json = new Utf8JsonWriter(buffer, options))
        {
            json.WriteStartObject();
            json.WriteStartObject("metadata");
            json.WriteNumber("total_size", TotalSize);
            json.WriteEndObject();
            json.WriteStartObject("weight_map");
            var names = _declared.Select(t => t.Name).ToList();
            names.Sort(SafetensorsWriter.Utf8Order);
            foreach (string name in names) json.WriteString(name, Path.GetFileName(_writerOf[name].Path));
            json.WriteEndObject();
            json.WriteEndObject();
        }
        return [.. buffer.WrittenSpan, (byte)'\n'];
    }

    private void EnsureShards()
    {
        if (_shards is not null) return;
        var groups = new List<List<int>>();
        long current = 0;
        for (int i = 0; i < _declared.Count; i++)
        {
            long bytes = _declared[i].Bytes;
            if (groups.Count == 0 || (groups[^1].Count > 0 && current + bytes > MaxShardBytes))
            {
                groups.Add([]);
                current = 0;
            }
            groups[^1].Add(i);
            current += bytes;
        }
        if (groups.Count == 0) groups.Add([]);

        Directory.CreateDirectory(_directory);
        var shards = new List<SafetensorsWriter>();
        for (int k = 0; k < groups.Count; k++)
        {
            string file = groups.Count == 1
                ? $"{_baseName}.safetensors"
                : $"{_baseName}-{k + 1:D5}-of-{groups.Count:D5}.safetensors";
            var writer = new SafetensorsWriter(Path.Combine(_directory, file), _metadata);
            shards.Add(writer);
            foreach (int i in groups[k])
            {
                writer.Declare(_declared[i].Name, _declared[i].DType, _declared[i].Shape);
                _writerOf.Add(_declared[i].Name, writer);
            }
        }
        _shards = shards;
    }

    private void RemoveStaleFiles(HashSet<string> kept)
    {
        var stale = new List<string>();
        string single = $"{_baseName}.safetensors";
        if (!kept.Contains(single)) stale.Add(Path.Combine(_directory, single));
        if (!kept.Contains(IndexFileName)) stale.Add(Path.Combine(_directory, IndexFileName));
        var shardName = new Regex($"^{Regex.Escape(_baseName)}-[0-9]{{5}}-of-[0-9]{{5}}\\.safetensors$", RegexOptions.CultureInvariant);
        foreach (string path in Directory.EnumerateFiles(_directory))
        {
            string file = Path.GetFileName(path);
            if (shardName.IsMatch(file) && !kept.Contains(file)) stale.Add(path);
        }
        foreach (string path in stale)
        {
            try { File.Delete(path); }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
    }

    private void ThrowIfClosed()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_committed) throw new InvalidOperationException($"{_directory}: already committed");
    }
}
