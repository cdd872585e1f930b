using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;

namespace QLora.Trainer;

/// <summary>
/// One contiguous block of optimizer-state bytes, either in device memory (on the CPU backend: ordinary anonymous
/// memory) or paged out to host memory (a memory-mapped temporary file: the OS keeps it in the page cache and it is not
/// counted as the process's anonymous memory). Zero-filled on allocation.
/// </summary>
public sealed unsafe class OptimizerStateMemory : IDisposable
{
    private readonly MemoryMappedFile? _map;
    private readonly MemoryMappedViewAccessor? _view;
    private byte* _pointer;

    /// <summary>Allocates <paramref name="bytes"/> zeroed bytes, paged (host) or not (device).</summary>
    public OptimizerStateMemory(long bytes, bool paged)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        Length = bytes;
        IsPaged = paged;
        long size = Math.Max(bytes, 1);
        if (paged)
        {
            var path = Path.Combine(Path.GetTempPath(), $"qlora-optimizer-{Environment.ProcessId}-{Guid.NewGuid():N}.state");
            var stream = new FileStream(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, 1, FileOptions.DeleteOnClose);
            try
            {
                stream.SetLength(size); // sparse: reads as zeros
                _map = MemoryMappedFile.CreateFromFile(stream, null, size, MemoryMappedFileAccess.ReadWrite, HandleInheritability.None, leaveOpen: false);
                _view = _map.CreateViewAccessor(0, size, MemoryMappedFileAccess.ReadWrite);
                byte* p = null;
                _view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
                _pointer = p + _view.PointerOffset;
            }
            catch
            {
                _view?.Dispose();
                _map?.Dispose();
                stream.Dispose();
                throw;
            }
        }
        else
        {
            _pointer = (byte*)NativeMemory.AlignedAlloc((nuint)size, 64);
            NativeMemory.Clear(_pointer, (nuint)size);
        }
    }

    /// <summary>Bytes held.</summary>
    public long Length { get; }

    /// <summary>True when the bytes live in host memory (a memory-mapped file) rather than device memory.</summary>
    public bool IsPaged { get; }

    /// <summary>The bytes [offset, offset + length).</summary>
    public Span<byte> Slice(long offset, int length)
    {
        ObjectDisposedException.ThrowIf(_pointer == null, this);
        if (offset < 0 || length < 0 || offset + length > Length) throw new ArgumentOutOfRangeException(nameof(offset));
        return new Span<byte>(_pointer + offset, length);
    }

    /// <summary>The address of byte <paramref name="offset"/>.</summary>
    public byte* At(long offset)
    {
        ObjectDisposedException.ThrowIf(_pointer == null, this);
        return _pointer + offset;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_pointer == null) return;
        if (_view is not null)
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
            _view.Dispose();
            _map!.Dispose();
        }
        else
        {
            NativeMemory.AlignedFree(_pointer);
        }
        _pointer = null;
    }
}
