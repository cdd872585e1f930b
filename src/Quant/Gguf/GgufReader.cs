using System.Text;

namespace QLora.Quant.Gguf;

/// <summary>
/// Reads a GGUF file's header, metadata and tensor infos (validated: magic, version 2 or 3, known types, tensors inside
/// the file and aligned), and tensor bytes on demand. For tests and <c>qlora inspect</c>-style checks of exported files.
/// </summary>
public sealed class GgufReader : IDisposable
{
    private const long MaxStringBytes = 1L << 30;
    private readonly FileStream _file;
    private readonly Dictionary<string, GgufTensorInfo> _byName = new(StringComparer.Ordinal);

    private GgufReader(string path, FileStream file, uint version, List<KeyValuePair<string, GgufValue>> metadata, List<GgufTensorInfo> tensors, int alignment, long dataOffset)
    {
        Path = path;
        _file = file;
        Version = version;
        Metadata = metadata;
        MetadataByKey = metadata.ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        Tensors = tensors;
        foreach (var t in tensors) _byName[t.Name] = t;
        Alignment = alignment;
        DataOffset = dataOffset;
    }

    /// <summary>The file read.</summary>
    public string Path { get; }
    /// <summary>The GGUF version.</summary>
    public uint Version { get; }
    /// <summary>Metadata in file order.</summary>
    public IReadOnlyList<KeyValuePair<string, GgufValue>> Metadata { get; }
    /// <summary>Metadata by key.</summary>
    public IReadOnlyDictionary<string, GgufValue> MetadataByKey { get; }
    /// <summary>Tensor infos in file order.</summary>
    public IReadOnlyList<GgufTensorInfo> Tensors { get; }
    /// <summary>The alignment in effect.</summary>
    public int Alignment { get; }
    /// <summary>Absolute offset of the data section.</summary>
    public long DataOffset { get; }

    /// <summary>The tensor named <paramref name="name"/>.</summary>
    public GgufTensorInfo GetInfo(string name) =>
        _byName.TryGetValue(name, out var t) ? t : throw new KeyNotFoundException($"{Path}: no tensor '{name}'");

    /// <summary>A tensor's raw bytes.</summary>
    public byte[] ReadTensor(string name)
    {
        var t = GetInfo(name);
        var bytes = new byte[checked((int)t.ByteLength)];
        RandomAccess.Read(_file.SafeFileHandle, bytes, DataOffset + t.Offset);
        return bytes;
    }

    /// <summary>Opens and validates <paramref name="path"/>; a malformed file throws <see cref="GgufFormatException"/>.</summary>
    public static GgufReader Open(string path)
    {
        var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        try
        {
            var r = new BinaryReader(new BufferedStream(file, 1 << 16), Encoding.UTF8, leaveOpen: true);
            try
            {
                uint magic = r.ReadUInt32();
                if (magic != GgufFormat.Magic) throw new GgufFormatException(path, "not a GGUF file (bad magic)");
                uint version = r.ReadUInt32();
                if (version is not (2 or 3)) throw new GgufFormatException(path, $"GGUF version {version} is not supported (2, 3)");
                ulong nTensors = r.ReadUInt64(), nKv = r.ReadUInt64();
                if (nTensors > 1_000_000 || nKv > 1_000_000) throw new GgufFormatException(path, "implausible tensor or metadata count");
                var metadata = new List<KeyValuePair<string, GgufValue>>();
                var keys = new HashSet<string>(StringComparer.Ordinal);
                for (ulong i = 0; i < nKv; i++)
                {
                    string key = ReadString(r, path);
                    if (!keys.Add(key)) throw new GgufFormatException(path, $"duplicate metadata key '{key}'");
                    var type = (GgufValueType)r.ReadUInt32();
                    metadata.Add(new(key, ReadValue(r, type, path, key)));
                }
                int alignment = GgufFormat.DefaultAlignment;
                if (metadata.FirstOrDefault(kv => kv.Key == GgufFormat.AlignmentKey).Value is { } a)
                {
                    if (a.Type != GgufValueType.UInt32) throw new GgufFormatException(path, $"{GgufFormat.AlignmentKey} must be uint32");
                    alignment = checked((int)(uint)a.Value);
                    if (alignment <= 0 || (alignment & (alignment - 1)) != 0) throw new GgufFormatException(path, $"alignment {alignment} is not a power of two");
                }
                var tensors = new List<GgufTensorInfo>();
                var names = new HashSet<string>(StringComparer.Ordinal);
                for (ulong i = 0; i < nTensors; i++)
                {
                    string name = ReadString(r, path);
                    if (!names.Add(name)) throw new GgufFormatException(path, $"duplicate tensor '{name}'");
                    uint dims = r.ReadUInt32();
                    if (dims is 0 or > GgufFormat.MaxDimensions) throw new GgufFormatException(path, $"tensor '{name}' has {dims} dimensions");
                    var ne = new long[dims];
                    for (int d = 0; d < dims; d++)
                    {
                        ulong v = r.ReadUInt64();
                        if (v == 0 || v > long.MaxValue / 2) throw new GgufFormatException(path, $"tensor '{name}' has dimension {v}");
                        ne[d] = (long)v;
                    }
                    uint type = r.ReadUInt32();
                    if (!GgmlTypes.IsKnown(type)) throw new GgufFormatException(path, $"tensor '{name}' has ggml type {type}, which this reader does not know");
                    ulong offset = r.ReadUInt64();
                    if (offset % (ulong)alignment != 0) throw new GgufFormatException(path, $"tensor '{name}' offset {offset} is not aligned to {alignment}");
                    Array.Reverse(ne);
                    var info = new GgufTensorInfo(name, (GgmlType)type, ne, (long)offset);
                    try { _ = info.ByteLength; }
                    catch (Exception e) when (e is ArgumentException or OverflowException) { throw new GgufFormatException(path, $"tensor '{name}': {e.Message}"); }
                    tensors.Add(info);
                }
                long headerEnd = r.BaseStream.Position;
                long dataOffset = GgufFormat.Align(headerEnd, alignment);
                foreach (var t in tensors)
                {
                    if (dataOffset + t.Offset + t.ByteLength > file.Length)
                        throw new GgufFormatException(path, $"tensor '{t.Name}' ends past the end of the file ({file.Length} bytes)");
                }
                return new GgufReader(path, file, version, metadata, tensors, alignment, dataOffset);
            }
            catch (EndOfStreamException e) { throw new GgufFormatException(path, "truncated header", e); }
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    private static GgufValue ReadValue(BinaryReader r, GgufValueType type, string path, string key)
    {
        if (type == GgufValueType.Array)
        {
            var elementType = (GgufValueType)r.ReadUInt32();
            ulong n = r.ReadUInt64();
            if (elementType == GgufValueType.Array || !Enum.IsDefined(elementType)) throw new GgufFormatException(path, $"metadata '{key}': array of type {(uint)elementType} is not supported");
            if (n > int.MaxValue || n > (ulong)(r.BaseStream.Length - r.BaseStream.Position)) throw new GgufFormatException(path, $"metadata '{key}': array of {n} elements does not fit the file");
            var array = Array.CreateInstance(GgufValue.ClrType(elementType), (int)n);
            for (int i = 0; i < (int)n; i++) array.SetValue(ReadScalar(r, elementType, path, key), i);
            return GgufValue.Array(elementType, array);
        }
        return type switch
        {
            GgufValueType.UInt8 => GgufValue.UInt8((byte)ReadScalar(r, type, path, key)),
            GgufValueType.Int8 => GgufValue.Int8((sbyte)ReadScalar(r, type, path, key)),
            GgufValueType.UInt16 => GgufValue.UInt16((ushort)ReadScalar(r, type, path, key)),
            GgufValueType.Int16 => GgufValue.Int16((short)ReadScalar(r, type, path, key)),
            GgufValueType.UInt32 => GgufValue.UInt32((uint)ReadScalar(r, type, path, key)),
            GgufValueType.Int32 => GgufValue.Int32((int)ReadScalar(r, type, path, key)),
            GgufValueType.Float32 => GgufValue.Float32((float)ReadScalar(r, type, path, key)),
            GgufValueType.Bool => GgufValue.Bool((bool)ReadScalar(r, type, path, key)),
            GgufValueType.String => GgufValue.String((string)ReadScalar(r, type, path, key)),
            GgufValueType.UInt64 => GgufValue.UInt64((ulong)ReadScalar(r, type, path, key)),
            GgufValueType.Int64 => GgufValue.Int64((long)ReadScalar(r, type, path, key)),
            GgufValueType.Float64 => GgufValue.Float64((double)ReadScalar(r, type, path, key)),
            _ => throw new GgufFormatException(path, $"metadata '{key}' has unknown type {(uint)type}"),
        };
    }

    private static object ReadScalar(BinaryReader r, GgufValueType type, string path, string key) => type switch
    {
        GgufValueType.UInt8 => r.ReadByte(),
        GgufValueType.Int8 => r.ReadSByte(),
        GgufValueType.UInt16 => r.ReadUInt16(),
        GgufValueType.Int16 => r.ReadInt16(),
        GgufValueType.UInt32 => r.ReadUInt32(),
        GgufValueType.Int32 => r.ReadInt32(),
        GgufValueType.Float32 => r.ReadSingle(),
        GgufValueType.Bool => r.ReadByte() switch { 0 => false, 1 => true, var b => throw new GgufFormatException(path, $"metadata '{key}': bool byte {b}") },
        GgufValueType.String => ReadString(r, path),
        GgufValueType.UInt64 => r.ReadUInt64(),
        GgufValueType.Int64 => r.ReadInt64(),
        GgufValueType.Float64 => r.ReadDouble(),
        _ => throw new GgufFormatException(path, $"metadata '{key}' has unknown type {(uint)type}"),
    };

    private static string ReadString(BinaryReader r, string path)
    {
        ulong n = r.ReadUInt64();
        if (n > MaxStringBytes || n > (ulong)(r.BaseStream.Length - r.BaseStream.Position)) throw new GgufFormatException(path, $"string of {n} bytes does not fit the file");
        var bytes = r.ReadBytes((int)n);
        try { return new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(bytes); }
        catch (DecoderFallbackException e) { throw new GgufFormatException(path, "string is not valid UTF-8", e); }
    }

    /// <summary>Closes the file.</summary>
    public void Dispose() => _file.Dispose();
}
