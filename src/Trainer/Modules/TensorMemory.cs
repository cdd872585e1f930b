using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>Raw addresses of tensor data, for kernels and dequantizers that write straight into torch-owned memory.</summary>
internal static partial class TensorMemory
{
    /// <summary>The address of a contiguous tensor's first element (storage offset included), on whatever device it lives.</summary>
    public static nint DataPointer(Tensor t)
    {
        if (!t.is_contiguous()) throw new ArgumentException("tensor must be contiguous to hand out its address");
        if (t.numel() == 0) return 0;
        var p = THSTensor_data(t.Handle);
        if (p == 0) throw new InvalidOperationException("libtorch returned no data pointer for a non-empty tensor");
        return p;
    }

    /// <summary>
    /// A CPU tensor over <paramref name="address"/> (torch's from_blob): no copy, nothing freed when the tensor goes.
    /// The caller keeps the memory alive (and, for a read-only mapping, never writes through the tensor) for as long as
    /// the tensor and every view of it exist. Used to read a memory-mapped checkpoint tensor in place.
    /// </summary>
    public static unsafe Tensor Alias(nint address, long[] shape, ScalarType dtype)
    {
        if (address == 0) throw new ArgumentException("no memory to alias", nameof(address));
        nint handle;
        fixed (long* sizes = shape)
            handle = THSTensor_new(address, &KeepMemory, sizes, shape.Length, (sbyte)dtype, (sbyte)dtype, 0, 0, false);
        if (handle == 0) throw new InvalidOperationException($"libtorch could not alias host memory as a [{string.Join(", ", shape)}] {dtype} tensor");
        return Tensor.UnsafeCreateTensor(handle);
    }

    [UnmanagedCallersOnly(CallConvs = [typeof(System.Runtime.CompilerServices.CallConvCdecl)])]
    private static void KeepMemory(nint data) { } // the memory belongs to the caller (a memory map), not to torch

    // TorchSharp's own native shim (already loaded by TorchSharp) exports these.
    [LibraryImport("LibTorchSharp")]
    private static partial nint THSTensor_data(nint handle);

    [LibraryImport("LibTorchSharp")]
    private static unsafe partial nint THSTensor_new(nint data, delegate* unmanaged[Cdecl]<nint, void> deleter, long* sizes, int szlength,
        sbyte scalarType, sbyte dtype, int deviceType, int deviceIndex, [MarshalAs(UnmanagedType.U1)] bool requiresGrad);
}
