namespace QLora.Kernels;

/// <summary>
/// Device descriptions for <c>qlora doctor</c>: total memory and the attributes that tell a user what card they have.
/// Symbols are resolved on first use, so a driver that lacks one fails only the call that needs it.
/// </summary>
public sealed unsafe partial class CudaDriver
{
    /// <summary><c>CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT</c>.</summary>
    public const int AttributeMultiprocessorCount = 16;
    /// <summary><c>CU_DEVICE_ATTRIBUTE_PCI_BUS_ID</c>.</summary>
    public const int AttributePciBusId = 33;

    private delegate* unmanaged<nuint*, int, int> _cuDeviceTotalMem;

    /// <summary>The device's total memory in bytes (<c>cuDeviceTotalMem</c>: no context needed).</summary>
    public long DeviceTotalMemory(int device)
    {
        if (_cuDeviceTotalMem == null) _cuDeviceTotalMem = (delegate* unmanaged<nuint*, int, int>)Symbol("cuDeviceTotalMem_v2");
        nuint bytes;
        Check(_cuDeviceTotalMem(&bytes, device), "cuDeviceTotalMem");
        return (long)bytes;
    }
}
