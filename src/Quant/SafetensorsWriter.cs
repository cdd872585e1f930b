using System.Buffers;
using System.Buffers.Binary;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace QLora.Quant;

/// <summary>
/// Writes one safetensors file atomically and tensor by tensor, so peak memory does not depend on the file size.
/// <see cref="Declare"/> every tensor first; the first <see cref="Write"/> fixes the layout (data area 8-byte aligned,
/// tensors packed without gaps, sorted by element size descending then by name, so each is aligned to its element
/// size) and writes the header into a pre-sized temporary file next to the target; tensors may then be written in any
/// order. <see cref="Commit"/> flushes and renames the temporary file over the target; disposing without committing
/// deletes it and leaves any existing target untouched.
/// </summary>
public sealed class SafetensorsWriter : IDisposable
{
    private readonly string _path;
    private readonly string _tempPath;
    private readonly SortedDictionary<string, string> _metadata = new(StringComparer.Ordinal);
    private readonly Dictionary<string, Entry> _entries = new(StringComparer.Ordinal);
    private FileStream? _stream;
    private long _dataStart = -1;
    private bool _committed;
    private bool _disposed;

    /// <summary>Starts a file that will replace <paramref name="path"/> on <see cref="Commit"/>, with optional <c>__metadata__</c> entries.</summary>
    public SafetensorsWriter(string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        _path = System.IO.Path.GetFullPath(path);
        CheckMetadata(metadata);
        if (metadata is not null)
        {
            foreach (var (key, value) in metadata) _metadata[key] = value;
        }
        _tempPath = WriteLeftovers.TempPathFor(_path);
    }

    /// <summary>The file this writer replaces on <see cref="Commit"/>.</summary>
    public string Path => _path;

    /// <summary>Total tensor bytes declared so far (headers not counted).</summary>
    public long DataBytes { get; private set; }

    /// <summary>Declares a tensor; every tensor must be declared before the first <see cref="Write"/>. Names must be unique.</summary>
    public void Declare(string name, TensorDType dtype, long[] shape)
    {
        ThrowIfClosed();
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(shape);
        if (_dataStart >= 0) throw new InvalidOperationException($"{_path}: cannot declare '{name}' after the first Write fixed the layout");
        if (_entries.ContainsKey(name)) throw new ArgumentException($"tensor '{name}' is already declared", nameof(name));
        long bytes = CheckDeclaration(name, dtype, shape);
        try { DataBytes = checked(DataBytes + bytes); }
        catch (OverflowException) { throw new ArgumentException($"tensor '{name}' makes the file too large", nameof(shape)); }
        _entries.Add(name, new Entry(name, dtype, (long[])shape.Clone(), bytes));
    }

    /// <summary>
    /// Writes a declared tensor's bytes (little-endian, exactly shape × element size of them), in any order, once each.
    /// The first call fixes the layout and writes the header.
    /// </summary>
    public void Write(string name, ReadOnlySpan<byte> data)
    {
        var entry = Find(name);
        if (entry.WrittenBytes > 0 || entry.Done) throw new InvalidOperationException($"{_path}: tensor '{name}' was already written");
        if (data.Length != entry.ByteLength)
            throw new ArgumentException($"{_path}: tensor '{name}' needs {entry.ByteLength} bytes, got {data.Length}", nameof(data));
        WriteAt(entry, data);
        entry.Done = true;
    }

    /// <summary>
    /// Appends the next part of a declared tensor's bytes, for tensors over 2 GB (which no span can hold) or bytes
    /// produced piece by piece; the tensor is complete once all its bytes were appended. Parts of different tensors
    /// may be interleaved.
    /// </summary>
    public void Append(string name, ReadOnlySpan<byte> chunk)
    {
        var entry = Find(name);
        if (entry.Done) throw new InvalidOperationException($"{_path}: tensor '{name}' was already written");
        if (chunk.Length > entry.ByteLength - entry.WrittenBytes)
            throw new ArgumentException($"{_path}: tensor '{name}' has {entry.ByteLength - entry.WrittenBytes} bytes left to write, got {chunk.Length}", nameof(chunk));
        WriteAt(entry, chunk);
        if (entry.WrittenBytes == entry.ByteLength) entry.Done = true;
    }

    /// <summary>True once every byte of a declared tensor was written.</summary>
    internal bool IsWritten(string name) => _entries[name].Done;

    private Entry Find(string name)
    {
        ThrowIfClosed();
        ArgumentNullException.ThrowIfNull(name);
        return _entries.TryGetValue(name, out var entry)
            ? entry
            : throw new ArgumentException($"{_path}: tensor '{name}' was not declared", nameof(name));
    }

    private void WriteAt(Entry entry, ReadOnlySpan<byte> data)
    {
        EnsureLayout();
        _stream!.Position = _dataStart + entry.Offset + entry.WrittenBytes;
        _stream.Write(data);
        entry.WrittenBytes += data.Length;
    }

    /// <summary>
    /// Checks that every declared tensor was written, flushes the temporary file to disk and renames it over
    /// <see cref="Path"/> in one atomic step.
    /// </summary>
    public void Commit()
    {
        ThrowIfClosed();
        var missing = _entries.Values.Where(e => !e.Done).Select(e => e.Name).Order(StringComparer.Ordinal).ToList();
        if (missing.Count > 0)
            throw new InvalidOperationException($"{_path}: {missing.Count} declared tensor(s) not written: {string.Join(", ", missing.Take(5))}{(missing.Count > 5 ? ", ..." : "")}");
        EnsureLayout();
        _stream!.Flush(flushToDisk: true);
        _stream.Dispose();
        _stream = null;
        FileReplace.ReplaceFile(_tempPath, _path);
        _committed = true;
    }

    /// <summary>
    /// Writes a whole file in one call. The tensors are enumerated once and kept in a list (their arrays already
    /// exist), then declared and written.
    /// </summary>
    public static void WriteFile(string path, IEnumerable<(string Name, TensorDType DType, long[] Shape, byte[] Data)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var list = tensors.ToList();
        using var writer = new SafetensorsWriter(path, metadata);
        foreach (var t in list) writer.Declare(t.Name, t.DType, t.Shape);
        foreach (var t in list) writer.Write(t.Name, t.Data);
        writer.Commit();
    }

    /// <summary>Deletes the temporary file unless <see cref="Commit"/> succeeded; an existing target is never touched.</summary>
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

    /// <summary>Checks that metadata keys and values are non-null, encodable strings.</summary>
    internal static void CheckMetadata(IReadOnlyDictionary<string, string>? metadata)
    {
        if (metadata is null) return;
        foreach (var (key, value) in metadata)
        {
            if (key is null || value is null) throw new ArgumentException("metadata keys and values must not be null", nameof(metadata));
            CheckEncodable(key, nameof(metadata));
            CheckEncodable(value, nameof(metadata));
        }
    }

    /// <summary>Checks a declaration against the format's rules (reserved name, valid UTF-16, known dtype, bounded non-negative shape) and returns its byte length.</summary>
    internal static long CheckDeclaration(string name, TensorDType dtype, long[] shape)
    {
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(shape);
        if (name == SafetensorsHeader.MetadataKey) throw new ArgumentException($"'{name}' is reserved for metadata", nameof(name));
        CheckEncodable(name, nameof(name));
        if (!Enum.IsDefined(dtype)) throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown dtype");
        if (shape.Length > SafetensorsHeader.MaxRank) throw new ArgumentException($"tensor '{name}' has more than {SafetensorsHeader.MaxRank} dimensions", nameof(shape));
        long bytes;
        try
        {
            long count = 1;
            foreach (long d in shape)
            {
                if (d < 0) throw new ArgumentException($"tensor '{name}' has a negative dimension", nameof(shape));
                count = checked(count * d);
            }
            bytes = checked(count * dtype.Size());
        }
        catch (OverflowException)
        {
            throw new ArgumentException($"tensor '{name}' shape [{string.Join(", ", shape)}] is too large", nameof(shape));
        }
        return bytes;
    }

    /// <summary>
    /// The order tensors take in the data area: element size descending, then name in UTF-8 byte order (as the reference
    /// implementation sorts), so every tensor starts at a multiple of its element size.
    /// </summary>
    internal static int LayoutOrder(TensorDType aType, string aName, TensorDType bType, string bName)
    {
        int bySize = bType.Size().CompareTo(aType.Size());
        return bySize != 0 ? bySize : Utf8Order(aName, bName);
    }

    /// <summary>Ordinal comparison by Unicode code point, which equals UTF-8 byte order.</summary>
    internal static int Utf8Order(string a, string b)
    {
        var ea = a.EnumerateRunes();
        var eb = b.EnumerateRunes();
        while (true)
        {
            bool ha = ea.MoveNext(), hb = eb.MoveNext();
            if (!ha || !hb) return ha.CompareTo(hb);
            int c = ea.Current.Value.CompareTo(eb.Current.Value);
            if (c != 0) return c;
        }
    }

    /// <summary>Builds the padded header (without the 8-byte length): metadata first, then tensors in layout order.</summary>
    internal static byte[] BuildHeader(IEnumerable<KeyValuePair<string, string>> metadata,
        IEnumerable<(string Name, TensorDType DType, long[] Shape, long Begin, long End)> tensors)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var json = new Utf8JsonWriter(buffer, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            json.WriteStartObject();
            bool any = false;
            foreach (var (key, value) in metadata)
            {
                if (!any) json.WriteStartObject(SafetensorsHeader.MetadataKey);
                any = true;
                json.WriteString(key, value);
            }
            if (any) json.WriteEndObject();
            foreach (var t in tensors)
            {
                json.WriteStartObject(t.Name);
                json.WriteString("dtype", t.DType.ToString());
                json.WriteStartArray("shape");
                foreach (long d in t.Shape) json.WriteNumberValue(d);
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(t.Begin);
                json.WriteNumberValue(t.End);
                json.WriteEndArray();
                json.WriteEndObject();
            }
            json.WriteEndObject();
        }
        int padded = (buffer.WrittenCount + 7) / 8 * 8;
        var header = new byte[padded];
        buffer.WrittenSpan.CopyTo(header);
        header.AsSpan(buffer.WrittenCount).Fill((byte)' ');
        return header;
    }

    private void EnsureLayout()
    {
        if (_dataStart >= 0)
        {
            if (_stream is null) throw new InvalidOperationException($"{_path}: an earlier Commit failed; start a new writer");
            return;
        }
        var ordered = _entries.Values.ToList();
        ordered.Sort((a, b) => LayoutOrder(a.DType, a.Name, b.DType, b.Name));
        long offset = 0;
        foreach (var e in ordered)
        {
            e.Offset = offset;
            offset += e.ByteLength;
        }
        byte[] header = BuildHeader(_metadata, ordered.Select(e => (e.Name, e.DType, e.Shape, e.Offset, e.Offset + e.ByteLength)));
        if (header.Length > SafetensorsHeader.MaxHeaderBytes)
            throw new InvalidOperationException($"{_path}: header of {header.Length} bytes exceeds the {SafetensorsHeader.MaxHeaderBytes}-byte limit readers accept");

        var stream = new FileStream(_tempPath, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, bufferSize: 1 << 16);
        try
        {
            stream.SetLength(8 + header.Length + offset);
            Span<byte> length = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(length, (ulong)header.Length);
            stream.Write(length);
            stream.Write(header);
        }
        catch
        {
            stream.Dispose();
            File.Delete(_tempPath);
            throw;
        }
        _stream = stream;
        _dataStart = 8 + header.Length;
    }

    private static void CheckEncodable(string text, string parameter)
    {
        try { _ = StrictUtf8.GetByteCount(text); }
        catch (EncoderFallbackException) { throw new ArgumentException($"'{text}' is not valid UTF-16 (lone surrogate)", parameter); }
    }

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    private void ThrowIfClosed()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_committed) throw new InvalidOperationException($"{_path}: already committed");
    }

    private sealed class Entry(string name, TensorDType dtype, long[] shape, long byteLength)
    {
        public string Name { get; } = name;
        public TensorDType DType { get; } = dtype;
        public long[] Shape { get; } = shape;
        public long ByteLength { get; } = byteLength;
        public long Offset { get; set; }
        public long WrittenBytes { get; set; }
        public bool Done { get; set; }
    }
}
