using ILGPU;
using ILGPU.Runtime;

namespace QLora.GpuCheck;

/// <summary>
/// An ILGPU buffer over device memory someone else allocated (here: cudaMalloc in the primary context, as libtorch
/// does), so a stock ILGPU kernel can be pointed at it. Only for showing the private-context hazard: ILGPU's kernels
/// run in ILGPU's own context, where this address is not mapped.
/// </summary>
internal sealed class ForeignMemoryBuffer : MemoryBuffer
{
    public ForeignMemoryBuffer(Accelerator accelerator, ulong pointer, long length, int elementSize)
        : base(accelerator, length, elementSize) => NativePtr = (nint)pointer;

    protected override void MemSet(AcceleratorStream stream, byte value, in ArrayView<byte> targetView) =>
        throw new NotSupportedException("foreign buffer");

    protected override void CopyFrom(AcceleratorStream stream, in ArrayView<byte> sourceView, in ArrayView<byte> targetView) =>
        throw new NotSupportedException("foreign buffer");

    protected override void CopyTo(AcceleratorStream stream, in ArrayView<byte> sourceView, in ArrayView<byte> targetView) =>
        throw new NotSupportedException("foreign buffer");

    protected override void DisposeAcceleratorObject(bool disposing)
    {
        // The memory belongs to its allocator.
    }
}
