using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;

namespace QLora.Quant;

/// <summary>
/// Read-only, memory-mapped access to one safetensors file, tensor by tensor, so a file larger than RAM can be read:
/// only the pages a caller touches are loaded. The header is fully validated by <see cref="Open"/>; any problem is a
/// <see cref="SafetensorsFormatException"/>. Spans and pointers handed out stay valid until <see cref="Dispose"/>.
/// The file must not be truncated in place while open (replacing it by rename, as the writers do, is safe); bytes are
/// little-endian as stored. Lookups and reads may run on several threads at once.
/// </summary>
public sealed unsafe class SafetensorsReader : ITensorSource, IDisposable
{
    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private byte* _base;
    private readonly Dictionary<string, TensorInfo> _byName;

    private SafetensorsReader(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, byte* basePointer, long length)
    {
        Path = path;
        _map = map;
        _view = view;
        _base = basePointer;
        FileLength = length;

        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(new ReadOnlySpan<byte>(basePointer, 8));
        if (headerLength > SafetensorsHeader.MaxHeaderBytes)
            throw new SafetensorsFormatException(path, $"header length {headerLength} exceeds the {SafetensorsHeader.MaxHeaderBytes}-byte limit");
        if (headerLength > (ulong)(length - 8))
            throw new SafetensorsFormatException(path, $"header length {headerLength} runs past the end of the {length}-byte file");
        DataStart = 8 + (long)headerLength;
        var (metadata, tensors) = SafetensorsHeader.Parse(
            new ReadOnlySpan<byte>(basePointer + 8, (int)headerLength), DataStart, length - DataStart, path);
        Metadata = metadata;
        Tensors = tensors;
        _byName = new Dictionary<string, TensorInfo>(tensors.Count, StringComparer.Ordinal);
        foreach (var t in tensors) _byName.Add(t.Name, t);
    }

    /// <summary>
    /// Maps <paramref name="path"/> read-only and validates its header: header length within the file and the 100 MB cap,
    /// UTF-8 JSON object, known dtypes, shape × element size equal to each byte range, ranges inside the data area and
    /// not overlapping, no duplicate names, string-to-string metadata. Data bytes are not read.
    /// </summary>
    /// <exception cref="SafetensorsFormatException">The file is not a valid safetensors file.</exception>
    public static SafetensorsReader Open(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete, bufferSize: 1);
        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        byte* pointer = null;
        try
        {
            long length = stream.Length;
            if (length < 8)
                throw new SafetensorsFormatException(path, $"file is {length} bytes, too short to hold the 8-byte header length");
            map = MemoryMappedFile.CreateFromFile(stream, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: false);
            view = map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
            return new SafetensorsReader(path, map, view, pointer + view.PointerOffset, length);
        }
        catch
        {
            if (pointer != null) view!.SafeMemoryMappedViewHandle.ReleasePointer();
            view?.Dispose();
            map?.Dispose();
            stream.Dispose();
            throw;
        }
    }

    /// <summary>The path the file was opened with; every error message starts with it.</summary>
    public string Path { get; }

    /// <summary>Size of the file in bytes.</summary>
    public long FileLength { get; }

    /// <summary>Absolute offset of the data area: 8 plus the header length.</summary>
    public long DataStart { get; }

    /// <summary>The header's <c>__metadata__</c> entries; empty when the file has none.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Every tensor, in header order.</summary>
    public IReadOnlyList<TensorInfo> Tensors { get; }

    /// <summary>True when the file holds a tensor named <paramref name="name"/>.</summary>
    public bool Contains(string name) => _byName.ContainsKey(name);

    /// <summary>Looks up a tensor; throws <see cref="KeyNotFoundException"/> naming the file and the tensor when it is absent.</summary>
    public TensorInfo GetInfo(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _byName.TryGetValue(name, out var info)
            ? info
            : throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");
    }

    /// <summary>
    /// Zero-copy view of a tensor's bytes inside the memory map, valid until <see cref="Dispose"/>. Throws
    /// <see cref="InvalidOperationException"/> for tensors over <see cref="int.MaxValue"/> bytes: use <see cref="GetPointer"/>.
    /// </summary>
    public ReadOnlySpan<byte> GetSpan(string name)
    {
        var info = GetInfo(name);
        if (info.ByteLength > int.MaxValue)
            throw new InvalidOperationException($"{Path}: tensor '{name}' has {info.ByteLength} bytes, too many for a span; use GetPointer");
        return new ReadOnlySpan<byte>(Base() + info.DataOffset, (int)info.ByteLength);
    }

    /// <summary>
    /// Zero-copy view of <paramref name="length"/> bytes of a tensor starting <paramref name="offset"/> bytes into it:
    /// how to walk a tensor too large for one span.
    /// </summary>
    public ReadOnlySpan<byte> GetSpan(string name, long offset, int length)
    {
        var info = GetInfo(name);
        if (offset < 0 || length < 0 || offset > info.ByteLength - length)
            throw new ArgumentOutOfRangeException(nameof(offset), $"{Path}: bytes [{offset}, {offset + length}) are outside tensor '{name}' of {info.ByteLength} bytes");
        return new ReadOnlySpan<byte>(Base() + info.DataOffset + offset, length);
    }

    /// <summary>Address of a tensor's first byte inside the memory map, for tensors of any size; valid until <see cref="Dispose"/>.</summary>
    public nint GetPointer(string name)
    {
        var info = GetInfo(name);
        return (nint)(Base() + info.DataOffset);
    }

    /// <summary>Copies a tensor's bytes into the start of <paramref name="destination"/>, which must be at least that long.</summary>
    public void ReadInto(string name, Span<byte> destination)
    {
        var info = GetInfo(name);
        if (destination.Length < info.ByteLength)
            throw new ArgumentException($"{Path}: tensor '{name}' has {info.ByteLength} bytes but the destination holds {destination.Length}", nameof(destination));
        new ReadOnlySpan<byte>(Base() + info.DataOffset, (int)info.ByteLength).CopyTo(destination);
    }

    /// <summary>Copies a tensor's bytes into a new array.</summary>
    public byte[] ReadBytes(string name)
    {
        var info = GetInfo(name);
        if (info.ByteLength > Array.MaxLength)
            throw new InvalidOperationException($"{Path}: tensor '{name}' has {info.ByteLength} bytes, too many for an array; use GetPointer");
        var bytes = GC.AllocateUninitializedArray<byte>((int)info.ByteLength);
        new ReadOnlySpan<byte>(Base() + info.DataOffset, bytes.Length).CopyTo(bytes);
        return bytes;
    }

    /// <summary>
    /// Copies a tensor into a new array of <typeparamref name="T"/>, whose size must equal the dtype's element size
    /// (e.g. float for F32, ushort or Half for F16/BF16); bytes are taken as stored (little-endian).
    /// </summary>
    public T[] Read<T>(string name) where T : unmanaged
    {
        var info = GetInfo(name);
        if (sizeof(T) != info.DType.Size())
            throw new ArgumentException($"{Path}: tensor '{name}' is {info.DType} ({info.DType.Size()} bytes per element) but {typeof(T).Name} has {sizeof(T)}");
        long count = info.ElementCount;
        if (count > Array.MaxLength)
            throw new InvalidOperationException($"{Path}: tensor '{name}' has {count} elements, too many for an array; use GetPointer");
        var values = GC.AllocateUninitializedArray<T>((int)count);
        fixed (T* destination = values)
        {
            Buffer.MemoryCopy(Base() + info.DataOffset, destination, info.ByteLength, info.ByteLength);
        }
        return values;
    }

    /// <summary>Unmaps the file; spans and pointers obtained earlier must no longer be used.</summary>
    public void Dispose()
    {
        if (_base == null) return;
        _base = null;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _map.Dispose();
    }

    private byte* Base() => _base != null ? _base : throw new ObjectDisposedException(nameof(SafetensorsReader), $"{Path} was closed");
}
