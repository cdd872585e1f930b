using System.Runtime.InteropServices;

namespace QLora.Kernels;

/// <summary>
/// The <c>kernelParams</c> array of one <c>cuLaunchKernel</c> call for an ILGPU-generated entry point: the launch
/// extent (<c>.b32</c>), then each <c>ArrayView&lt;T&gt;</c> as 16 bytes <c>{ ulong pointer; long length }</c>, then
/// scalars by value. Owns unmanaged storage for the values and the pointer array until disposed.
/// </summary>
public sealed unsafe class KernelArguments : IDisposable
{
    private const int SlotBytes = 16;
    private readonly byte* _values;
    private readonly void** _pointers;
    private readonly int _capacity;
    private readonly List<int> _sizes = [];

    /// <summary>Room for up to <paramref name="capacity"/> arguments.</summary>
    public KernelArguments(int capacity)
    {
        _capacity = capacity;
        _values = (byte*)NativeMemory.AlignedAlloc((nuint)(capacity * SlotBytes), SlotBytes);
        _pointers = (void**)NativeMemory.Alloc((nuint)(capacity * sizeof(void*)));
    }

    /// <summary>Arguments added so far.</summary>
    public int Count { get; private set; }

    /// <summary>The byte size of each argument, in order (4 or 8 for scalars, 16 for views): checked against the PTX <c>.param</c> list.</summary>
    public IReadOnlyList<int> Sizes => _sizes;

    /// <summary>The array to pass as <c>kernelParams</c>.</summary>
    public void** Pointers => _pointers;

    /// <summary>Appends a scalar (int, long, float, …) by value.</summary>
    public KernelArguments Scalar<T>(T value) where T : unmanaged
    {
        if (sizeof(T) > SlotBytes) throw new ArgumentException("scalar larger than 16 bytes");
        return Add(&value, sizeof(T));
    }

    /// <summary>Appends an <c>ArrayView&lt;T&gt;</c> of <paramref name="length"/> elements at device address <paramref name="pointer"/>.</summary>
    public KernelArguments View(ulong pointer, long length)
    {
        long* pair = stackalloc long[2] { (long)pointer, length };
        return Add(pair, SlotBytes);
    }

    private KernelArguments Add(void* value, int bytes)
    {
        if (Count == _capacity) throw new InvalidOperationException($"more than {_capacity} kernel arguments");
        byte* slot = _values + Count * SlotBytes;
        Buffer.MemoryCopy(value, slot, SlotBytes, bytes);
        _pointers[Count++] = slot;
        _sizes.Add(bytes);
        return this;
    }

    /// <summary>Frees the unmanaged storage.</summary>
    public void Dispose()
    {
        NativeMemory.AlignedFree(_values);
        NativeMemory.Free(_pointers);
    }
}
