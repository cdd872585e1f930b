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

    // TorchSharp's own native shim (already loaded by TorchSharp) exports this.
    [LibraryImport("LibTorchSharp")]
    private static partial nint THSTensor_data(nint handle);
}
