using System.Text;

namespace QLora.Quant.Gguf;

/// <summary>
/// Writes one GGUF v3 file atomically and tensor by tensor, so peak memory does not depend on the model size. Add the
/// metadata and <see cref="Declare"/> every tensor first; the first <see cref="Write"/> or <see cref="Append"/> fixes the
/// layout (tensors in declaration order, each at a multiple of the alignment, <c>general.alignment</c> = 32 recorded)
/// and writes header, metadata and tensor infos into a temporary file beside the target. <see cref="Commit"/> flushes
/// and renames it over the target; disposing without committing deletes it and leaves any existing target untouched.
/// </summary>
public sealed class GgufWriter : IDisposable
{
    private readonly string _path;
    private readonly string _tempPath;
    private readonly List<KeyValuePair<string, GgufValue>> _metadata = [];
    private readonly List<Entry> _tensors = [];
    private readonly Dictionary<string, Entry> _byName = new(StringComparer.Ordinal);
    private FileStream? _stream;
    private long _dataStart = -1;
    private bool _committed;
    private bool _disposed;

    /// <summary>Starts a file that will replace <paramref name="path"/> on <see cref="Commit"/>.</summary>
    public GgufWriter(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        _path = System.IO.Path.GetFullPath(path);
        _tempPath = WriteLeftovers.TempPathFor(_path); // same leftover naming as every other writer (the PID lets a later run clean it)
    }

    /// <summary>The file this writer replaces on <see cref="Commit"/>.</summary>
    public string Path => _path;

    /// <summary>The alignment of the data section and of each tensor.</summary>
    public int Alignment => GgufFormat.DefaultAlignment;

    /// <summary>The metadata added so far, in order.</summary>
    public IReadOnlyList<KeyValuePair<string, GgufValue>> Metadata => _metadata;

    /// <summary>Adds a metadata key; keys are unique. <c>general.alignment</c> is written by the writer itself.</summary>
    public void Add(string key, GgufValue value)
    {
        ThrowIfFixed();
        ArgumentException.ThrowIfNullOrEmpty(key);
        ArgumentNullException.ThrowIfNull(value);
        if (key == GgufFormat.AlignmentKey) throw new ArgumentException($"{key} is written by the writer ({GgufFormat.DefaultAlignment})", nameof(key));
        if (_metadata.Any(kv => kv.Key == key)) throw new ArgumentException($"metadata key '{key}' was already added", nameof(key));
        _metadata.Add(new(key, value));
    }

    /// <summary>
    /// Declares a tensor of <paramref name="type"/> with a PyTorch-order <paramref name="shape"/> (the last dimension is the
    /// row, which must hold whole blocks of a quantized type). Names are unique.
    /// </summary>
    public void Declare(string name, GgmlType type, long[] shape)
    {
        ThrowIfFixed();
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(shape);
        if (!Enum.IsDefined(type)) throw new ArgumentOutOfRangeException(nameof(type), type, "unknown ggml type");
        if (shape.Length is 0 or > GgufFormat.MaxDimensions) throw new ArgumentException($"tensor '{name}' has {shape.Length} dimensions; ggml takes 1 to {GgufFormat.MaxDimensions}", nameof(shape));
        if (shape.Any(d => d <= 0)) throw new ArgumentException($"tensor '{name}' has a dimension below 1", nameof(shape));
        if (_byName.ContainsKey(name)) throw new ArgumentException($"tensor '{name}' is already declared", nameof(name));
        var info = new GgufTensorInfo(name, type, (long[])shape.Clone(), 0);
        long bytes = info.ByteLength; // throws for rows that are not whole blocks
        var entry = new Entry(info, bytes);
        _tensors.Add(entry);
        _byName.Add(name, entry);
    }

    /// <summary>Writes a declared tensor's bytes (exactly its byte length), once, in any order.</summary>
    public void Write(string name, ReadOnlySpan<byte> data)
    {
        var e = Find(name);
        if (e.Written > 0) throw new InvalidOperationException($"{_path}: tensor '{name}' was already written");
        if (data.Length != e.Bytes) throw new ArgumentException($"{_path}: tensor '{name}' needs {e.Bytes} bytes, got {data.Length}", nameof(data));
        WriteAt(e, data);
    }

    /// <summary>Appends the next part of a declared tensor's bytes (for tensors produced row block by row block).</summary>
    public void Append(string name, ReadOnlySpan<byte> chunk)
    {
        var e = Find(name);
        if (chunk.Length > e.Bytes - e.Written)
            throw new ArgumentException($"{_path}: tensor '{name}' has {e.Bytes - e.Written} bytes left to write, got {chunk.Length}", nameof(chunk));
        WriteAt(e, chunk);
    }

    /// <summary>Checks every tensor is complete, flushes the temporary file to disk and renames it over <see cref="Path"/>.</summary>
    public void Commit()
    {
        ThrowIfClosed();
        var missing = _tensors.Where(t => t.Written != t.Bytes).Select(t => t.Info.Name).ToList();
        if (missing.Count > 0)
            throw new InvalidOperationException($"{_path}: {missing.Count} declared tensor(s) not completely written: {string.Join(", ", missing.Take(5))}{(missing.Count > 5 ? ", ..." : "")}");
        EnsureLayout();
        _stream!.SetLength(_dataStart + DataLength());
        _stream.Flush(flushToDisk: true);
        _stream.Dispose();
        _stream = null;
        FileReplace.ReplaceFile(_tempPath, _path);
        _committed = true;
    }

    /// <summary>Deletes the temporary file unless <see cref="Commit"/> succeeded.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        var stream = _stream;
        _stream = null;
        if (_committed)
        {
            stream?.Dispose();
            return;
        }
        AtomicFile.Abandon(stream, _tempPath);
    }

    private Entry Find(string name)
    {
        ThrowIfClosed();
        ArgumentNullException.ThrowIfNull(name);
        return _byName.TryGetValue(name, out var e) ? e : throw new ArgumentException($"{_path}: tensor '{name}' was not declared", nameof(name));
    }

    private void WriteAt(Entry e, ReadOnlySpan<byte> data)
    {
        EnsureLayout();
        _stream!.Position = _dataStart + e.Offset + e.Written;
        _stream.Write(data);
        e.Written += data.Length;
    }

    private long DataLength() => _tensors.Count == 0 ? 0 : GgufFormat.Align(_tensors[^1].Offset + _tensors[^1].Bytes, Alignment);

    private void EnsureLayout()
    {
        if (_dataStart >= 0) return;
        long offset = 0;
        foreach (var t in _tensors)
        {
            t.Offset = offset;
            offset = GgufFormat.Align(offset + t.Bytes, Alignment);
        }
        var header = new MemoryStream();
        using (var w = new BinaryWriter(header, Encoding.UTF8, leaveOpen: true))
        {
            w.Write(GgufFormat.Magic);
            w.Write(GgufFormat.Version);
            w.Write((ulong)_tensors.Count);
            w.Write((ulong)(_metadata.Count + 1));
            foreach (var (key, value) in _metadata) WriteKv(w, key, value);
            WriteKv(w, GgufFormat.AlignmentKey, GgufValue.UInt32((uint)Alignment));
            foreach (var t in _tensors)
            {
                WriteString(w, t.Info.Name);
                w.Write((uint)t.Info.Shape.Length);
                for (int d = t.Info.Shape.Length - 1; d >= 0; d--) w.Write((ulong)t.Info.Shape[d]);
                w.Write((uint)t.Info.Type);
                w.Write((ulong)t.Offset);
            }
        }
        _dataStart = GgufFormat.Align(header.Length, Alignment);
        header.SetLength(_dataStart); // zero padding
        _stream = new FileStream(_tempPath, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
        _stream.Write(header.GetBuffer(), 0, (int)header.Length);
        // Zero the gaps between tensors: pre-size the file (sparse zeros) so every padding byte reads as 0.
        _stream.SetLength(_dataStart + DataLength());
    }

    private static void WriteKv(BinaryWriter w, string key, GgufValue value)
    {
        WriteString(w, key);
        w.Write((uint)value.Type);
        if (value.Type == GgufValueType.Array)
        {
            var array = (Array)value.Value;
            w.Write((uint)value.ElementType);
            w.Write((ulong)array.Length);
            foreach (var item in array) WriteScalar(w, value.ElementType, item!);
        }
        else WriteScalar(w, value.Type, value.Value);
    }

    private static void WriteScalar(BinaryWriter w, GgufValueType type, object v)
    {
        switch (type)
        {
            case GgufValueType.UInt8: w.Write((byte)v); break;
            case GgufValueType.Int8: w.Write((sbyte)v); break;
            case GgufValueType.UInt16: w.Write((ushort)v); break;
            case GgufValueType.Int16: w.Write((short)v); break;
            case GgufValueType.UInt32: w.Write((uint)v); break;
            case GgufValueType.Int32: w.Write((int)v); break;
            case GgufValueType.Float32: w.Write((float)v); break;
            case GgufValueType.Bool: w.Write((byte)((bool)v ? 1 : 0)); break;
            case GgufValueType.String: WriteString(w, (string)v); break;
            case GgufValueType.UInt64: w.Write((ulong)v); break;
            case GgufValueType.Int64: w.Write((long)v); break;
            case GgufValueType.Float64: w.Write((double)v); break;
            default: throw new ArgumentOutOfRangeException(nameof(type), type, "not a scalar GGUF type");
        }
    }

    private static void WriteString(BinaryWriter w, string s)
    {
        var bytes = Encoding.UTF8.GetBytes(s);
        w.Write((ulong)bytes.Length);
        w.Write(bytes);
    }

    private void ThrowIfFixed()
    {
        ThrowIfClosed();
        if (_dataStart >= 0) throw new InvalidOperationException($"{_path}: metadata and tensors must be declared before the first tensor is written");
    }

    private void ThrowIfClosed()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_committed) throw new InvalidOperationException($"{_path}: already committed");
    }

    private sealed class Entry(GgufTensorInfo info, long bytes)
    {
        public GgufTensorInfo Info { get; } = info;
        public long Bytes { get; } = bytes;
        public long Offset { get; set; }
        public long Written { get; set; }
    }
}
