using QLora.Kernels;
using QLora.Quant;

namespace QLora.GpuCheck;

/// <summary>A double-quantized 4-bit tensor uploaded with the driver API into the current (primary) context.</summary>
internal sealed unsafe class DeviceTensor : IDisposable
{
    private readonly CudaDriver _driver;
    private readonly ulong[] _allocations;

    public DeviceTensor(CudaDriver driver, QuantizedTensor t)
    {
        _driver = driver;
        var nested = t.State.Nested!;
        ulong packed = Upload(t.Packed), codes = Upload(nested.Codes), absmax2 = Upload(nested.Absmax), map = Upload(nested.Map);
        _allocations = [packed, codes, absmax2, map];
        Pointers = new FourBitPointers
        {
            Packed = (nint)packed, Count = t.Count, Blocksize = t.State.Blocksize, QuantType = t.State.QuantType,
            AbsmaxCodes = (nint)codes, NestedAbsmax = (nint)absmax2, NestedMap = (nint)map, Offset = nested.Offset,
            NestedBlocksize = nested.Blocksize,
        };
    }

    /// <summary>The device addresses, ready for <see cref="IFourBitDequantizer.Dequantize"/>.</summary>
    public FourBitPointers Pointers { get; }

    private ulong Upload<T>(T[] data) where T : unmanaged
    {
        long bytes = data.LongLength * sizeof(T);
        ulong p = _driver.Allocate(bytes);
        fixed (T* d = data) _driver.CopyToDevice(p, d, bytes);
        return p;
    }

    public void Dispose()
    {
        foreach (var p in _allocations) _driver.Free(p);
    }
}
