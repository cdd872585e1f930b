using System.Runtime.InteropServices;

namespace QLora.Kernels;

/// <summary>
/// The few CUDA driver API entry points this project needs, bound at run time from <c>libcuda.so.1</c> (Linux) or
/// <c>nvcuda.dll</c> (Windows) through <see cref="NativeLibrary"/>, so nothing loads until CUDA is asked for and a
/// CPU-only machine never touches it. Contexts: only the device's primary context (the one libtorch and the CUDA
/// runtime use) is ever retained; there is deliberately no binding for <c>cuCtxCreate</c>.
/// </summary>
public sealed unsafe partial class CudaDriver
{
    /// <summary><c>CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR</c>.</summary>
    public const int AttributeComputeCapabilityMajor = 75;
    /// <summary><c>CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR</c>.</summary>
    public const int AttributeComputeCapabilityMinor = 76;
    /// <summary><c>CU_POINTER_ATTRIBUTE_CONTEXT</c>: the context that owns a device pointer.</summary>
    public const int PointerAttributeContext = 1;

    private static readonly Lazy<CudaDriver> SharedDriver = new(() => Load());

    private readonly nint _library;

    /// <summary>The library names tried, in order, for this OS.</summary>
    public static IReadOnlyList<string> LibraryNames => OperatingSystem.IsWindows() ? ["nvcuda.dll"] : ["libcuda.so.1", "libcuda.so"];

    /// <summary>The process-wide driver, loaded and initialised (<c>cuInit</c>) on first use; throws <see cref="CudaUnavailableException"/> if it cannot be.</summary>
    public static CudaDriver Shared => SharedDriver.Value;

    /// <summary>True if the driver library loads and <c>cuInit</c> succeeds with at least one device; never throws.</summary>
    public static bool TryGetShared(out CudaDriver? driver, out string? reason)
    {
        try
        {
            driver = Shared;
            reason = driver.DeviceCount() > 0 ? null : "the CUDA driver reports no devices";
            if (reason != null) driver = null;
            return driver != null;
        }
        catch (CudaUnavailableException e)
        {
            driver = null;
            reason = e.Message;
            return false;
        }
    }

    /// <summary>The handle of the loaded driver library (for redirecting other libraries' imports to it).</summary>
    public nint LibraryHandle => _library;

    /// <summary>The file name the driver was loaded from.</summary>
    public string LibraryName { get; }

    private CudaDriver(nint library, string name)
    {
        _library = library;
        LibraryName = name;
        _cuGetErrorName = (delegate* unmanaged<int, byte**, int>)Symbol("cuGetErrorName");
        _cuGetErrorString = (delegate* unmanaged<int, byte**, int>)Symbol("cuGetErrorString");
        _cuInit = (delegate* unmanaged<uint, int>)Symbol("cuInit");
        _cuDriverGetVersion = (delegate* unmanaged<int*, int>)Symbol("cuDriverGetVersion");
        _cuDeviceGetCount = (delegate* unmanaged<int*, int>)Symbol("cuDeviceGetCount");
        _cuDeviceGet = (delegate* unmanaged<int*, int, int>)Symbol("cuDeviceGet");
        _cuDeviceGetAttribute = (delegate* unmanaged<int*, int, int, int>)Symbol("cuDeviceGetAttribute");
        _cuDeviceGetName = (delegate* unmanaged<byte*, int, int, int>)Symbol("cuDeviceGetName");
        _cuDevicePrimaryCtxRetain = (delegate* unmanaged<nint*, int, int>)Symbol("cuDevicePrimaryCtxRetain");
        _cuDevicePrimaryCtxRelease = (delegate* unmanaged<int, int>)Symbol("cuDevicePrimaryCtxRelease_v2");
        _cuCtxGetCurrent = (delegate* unmanaged<nint*, int>)Symbol("cuCtxGetCurrent");
        _cuCtxSetCurrent = (delegate* unmanaged<nint, int>)Symbol("cuCtxSetCurrent");
        _cuCtxSynchronize = (delegate* unmanaged<int>)Symbol("cuCtxSynchronize");
        _cuModuleLoadDataEx = (delegate* unmanaged<nint*, void*, uint, int*, void**, int>)Symbol("cuModuleLoadDataEx");
        _cuModuleGetFunction = (delegate* unmanaged<nint*, nint, byte*, int>)Symbol("cuModuleGetFunction");
        _cuModuleUnload = (delegate* unmanaged<nint, int>)Symbol("cuModuleUnload");
        _cuLaunchKernel = (delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int>)Symbol("cuLaunchKernel");
        _cuMemAlloc = (delegate* unmanaged<ulong*, nuint, int>)Symbol("cuMemAlloc_v2");
        _cuMemFree = (delegate* unmanaged<ulong, int>)Symbol("cuMemFree_v2");
        _cuMemcpyHtoD = (delegate* unmanaged<ulong, void*, nuint, int>)Symbol("cuMemcpyHtoD_v2");
        _cuMemcpyDtoH = (delegate* unmanaged<void*, ulong, nuint, int>)Symbol("cuMemcpyDtoH_v2");
        _cuMemcpyDtoDAsync = (delegate* unmanaged<ulong, ulong, nuint, nint, int>)Symbol("cuMemcpyDtoDAsync_v2");
        _cuMemsetD8 = (delegate* unmanaged<ulong, byte, nuint, int>)Symbol("cuMemsetD8_v2");
        _cuEventCreate = (delegate* unmanaged<nint*, uint, int>)Symbol("cuEventCreate");
        _cuEventRecord = (delegate* unmanaged<nint, nint, int>)Symbol("cuEventRecord");
        _cuEventSynchronize = (delegate* unmanaged<nint, int>)Symbol("cuEventSynchronize");
        _cuEventElapsedTime = (delegate* unmanaged<float*, nint, nint, int>)Symbol("cuEventElapsedTime");
        _cuEventDestroy = (delegate* unmanaged<nint, int>)Symbol("cuEventDestroy_v2");
        _cuPointerGetAttribute = (delegate* unmanaged<void*, int, ulong, int>)Symbol("cuPointerGetAttribute");
    }

    private static CudaDriver Load()
    {
        nint handle = 0;
        string? loaded = null;
        var errors = new List<string>();
        foreach (var name in LibraryNames)
        {
            if (NativeLibrary.TryLoad(name, out handle)) { loaded = name; break; }
            errors.Add(name);
        }
        if (loaded == null)
            throw new CudaUnavailableException(
                $"the NVIDIA CUDA driver library is not installed or not on the loader path (tried {string.Join(", ", errors)}). " +
                "Install the NVIDIA driver (it provides libcuda.so.1 / nvcuda.dll), or run on the CPU (device: cpu).");
        CudaDriver driver;
        try
        {
            driver = new CudaDriver(handle, loaded);
        }
        catch (EntryPointNotFoundException e)
        {
            throw new CudaUnavailableException($"{loaded} is too old: {e.Message}. Update the NVIDIA driver (CUDA 11.0 or newer), or run on the CPU.", e);
        }
        int r = driver._cuInit(0);
        if (r != 0)
            throw new CudaUnavailableException(
                $"cuInit failed: {driver.ErrorName(r)} ({r}): {driver.ErrorString(r)}. No usable NVIDIA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES), or run on the CPU.");
        return driver;
    }

    private nint Symbol(string name) => NativeLibrary.GetExport(_library, name);

    private readonly delegate* unmanaged<int, byte**, int> _cuGetErrorName, _cuGetErrorString;
    private readonly delegate* unmanaged<uint, int> _cuInit;
    private readonly delegate* unmanaged<int*, int> _cuDriverGetVersion, _cuDeviceGetCount;
    private readonly delegate* unmanaged<int*, int, int> _cuDeviceGet;
    private readonly delegate* unmanaged<int*, int, int, int> _cuDeviceGetAttribute;
    private readonly delegate* unmanaged<byte*, int, int, int> _cuDeviceGetName;
    private readonly delegate* unmanaged<nint*, int, int> _cuDevicePrimaryCtxRetain;
    private readonly delegate* unmanaged<int, int> _cuDevicePrimaryCtxRelease;
    private readonly delegate* unmanaged<nint*, int> _cuCtxGetCurrent;
    private readonly delegate* unmanaged<nint, int> _cuCtxSetCurrent;
    private readonly delegate* unmanaged<int> _cuCtxSynchronize;
    private readonly delegate* unmanaged<nint*, void*, uint, int*, void**, int> _cuModuleLoadDataEx;
    private readonly delegate* unmanaged<nint*, nint, byte*, int> _cuModuleGetFunction;
    private readonly delegate* unmanaged<nint, int> _cuModuleUnload;
    private readonly delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int> _cuLaunchKernel;
    private readonly delegate* unmanaged<ulong*, nuint, int> _cuMemAlloc;
    private readonly delegate* unmanaged<ulong, int> _cuMemFree;
    private readonly delegate* unmanaged<ulong, void*, nuint, int> _cuMemcpyHtoD;
    private readonly delegate* unmanaged<void*, ulong, nuint, int> _cuMemcpyDtoH;
    private readonly delegate* unmanaged<ulong, ulong, nuint, nint, int> _cuMemcpyDtoDAsync;
    private readonly delegate* unmanaged<ulong, byte, nuint, int> _cuMemsetD8;
    private readonly delegate* unmanaged<nint*, uint, int> _cuEventCreate;
    private readonly delegate* unmanaged<nint, nint, int> _cuEventRecord;
    private readonly delegate* unmanaged<nint, int> _cuEventSynchronize, _cuEventDestroy;
    private readonly delegate* unmanaged<float*, nint, nint, int> _cuEventElapsedTime;
    private readonly delegate* unmanaged<void*, int, ulong, int> _cuPointerGetAttribute;

    /// <summary>The driver's symbolic name of a <c>CUresult</c>.</summary>
    public string ErrorName(int result)
    {
        byte* s = null;
        return _cuGetErrorName(result, &s) == 0 && s != null ? Marshal.PtrToStringUTF8((nint)s)! : $"CUresult {result}";
    }

    /// <summary>The driver's description of a <c>CUresult</c>.</summary>
    public string ErrorString(int result)
    {
        byte* s = null;
        return _cuGetErrorString(result, &s) == 0 && s != null ? Marshal.PtrToStringUTF8((nint)s)! : "unknown error";
    }

    /// <summary>Throws <see cref="CudaException"/> unless <paramref name="result"/> is CUDA_SUCCESS.</summary>
    public void Check(int result, string call)
    {
        if (result != 0) throw new CudaException(call, result, ErrorName(result), ErrorString(result));
    }

    /// <summary>The driver's CUDA version as major·1000 + minor·10 (e.g. 12040).</summary>
    public int DriverVersion()
    {
        int v;
        Check(_cuDriverGetVersion(&v), "cuDriverGetVersion");
        return v;
    }

    /// <summary>Number of visible CUDA devices.</summary>
    public int DeviceCount()
    {
        int n;
        Check(_cuDeviceGetCount(&n), "cuDeviceGetCount");
        return n;
    }

    /// <summary>The device handle of ordinal <paramref name="ordinal"/>.</summary>
    public int Device(int ordinal)
    {
        int d;
        Check(_cuDeviceGet(&d, ordinal), "cuDeviceGet");
        return d;
    }

    /// <summary>A device attribute (<c>CU_DEVICE_ATTRIBUTE_*</c>).</summary>
    public int DeviceAttribute(int device, int attribute)
    {
        int v;
        Check(_cuDeviceGetAttribute(&v, attribute, device), "cuDeviceGetAttribute");
        return v;
    }

    /// <summary>The device's marketing name.</summary>
    public string DeviceName(int device)
    {
        byte* buffer = stackalloc byte[256];
        Check(_cuDeviceGetName(buffer, 256, device), "cuDeviceGetName");
        return Marshal.PtrToStringUTF8((nint)buffer) ?? "";
    }

    /// <summary>Retains the device's primary context (created by whoever came first, libtorch included); pair with <see cref="ReleasePrimaryContext"/>.</summary>
    public nint RetainPrimaryContext(int device)
    {
        nint ctx;
        Check(_cuDevicePrimaryCtxRetain(&ctx, device), "cuDevicePrimaryCtxRetain");
        return ctx;
    }

    /// <summary>Releases one retain of the primary context.</summary>
    public void ReleasePrimaryContext(int device) => Check(_cuDevicePrimaryCtxRelease(device), "cuDevicePrimaryCtxRelease");

    /// <summary>The context current on the calling thread (0 if none).</summary>
    public nint CurrentContext()
    {
        nint ctx;
        Check(_cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
        return ctx;
    }

    /// <summary>Makes <paramref name="context"/> current on the calling thread.</summary>
    public void SetCurrentContext(nint context) => Check(_cuCtxSetCurrent(context), "cuCtxSetCurrent");

    /// <summary>Waits for all work in the current context; returns the raw result (a kernel fault surfaces here).</summary>
    public int TrySynchronize() => _cuCtxSynchronize();

    /// <summary>Waits for all work in the current context.</summary>
    public void Synchronize() => Check(_cuCtxSynchronize(), "cuCtxSynchronize");

    /// <summary>Loads a PTX module into the current context; a JIT failure includes the driver's log.</summary>
    public nint LoadModule(string ptx)
    {
        const int JitErrorLogBuffer = 5, JitErrorLogBufferSizeBytes = 6;
        const int LogSize = 8192;
        byte[] image = System.Text.Encoding.ASCII.GetBytes(ptx + "\0");
        byte* log = stackalloc byte[LogSize];
        log[0] = 0;
        int* options = stackalloc int[] { JitErrorLogBuffer, JitErrorLogBufferSizeBytes };
        void** values = stackalloc void*[] { log, (void*)LogSize };
        nint module;
        int r;
        fixed (byte* p = image) r = _cuModuleLoadDataEx(&module, p, 2, options, values);
        if (r != 0)
            throw new CudaException("cuModuleLoadDataEx", r, ErrorName(r), ErrorString(r) + ": " + Marshal.PtrToStringUTF8((nint)log));
        return module;
    }

    /// <summary>The function named <paramref name="entryName"/> in a loaded module.</summary>
    public nint ModuleFunction(nint module, string entryName)
    {
        byte[] name = System.Text.Encoding.ASCII.GetBytes(entryName + "\0");
        nint fn;
        fixed (byte* p = name) Check(_cuModuleGetFunction(&fn, module, p), $"cuModuleGetFunction({entryName})");
        return fn;
    }

    /// <summary>Unloads a module.</summary>
    public void UnloadModule(nint module) => Check(_cuModuleUnload(module), "cuModuleUnload");

    /// <summary>Launches a 1-D grid on <paramref name="stream"/> (0 = the legacy default stream, which libtorch's default stream is ordered with).</summary>
    public int TryLaunch(nint function, uint gridX, uint blockX, uint sharedBytes, nint stream, void** parameters) =>
        _cuLaunchKernel(function, gridX, 1, 1, blockX, 1, 1, sharedBytes, stream, parameters, null);

    /// <summary>Allocates device memory in the current context.</summary>
    public ulong Allocate(long bytes)
    {
        ulong p;
        Check(_cuMemAlloc(&p, (nuint)Math.Max(bytes, 1)), $"cuMemAlloc({bytes})");
        return p;
    }

    /// <summary>Frees device memory.</summary>
    public void Free(ulong pointer) => Check(_cuMemFree(pointer), "cuMemFree");

    /// <summary>Copies host → device (synchronous).</summary>
    public void CopyToDevice(ulong destination, void* source, long bytes) =>
        Check(_cuMemcpyHtoD(destination, source, (nuint)bytes), "cuMemcpyHtoD");

    /// <summary>Copies device → host (synchronous).</summary>
    public void CopyToHost(void* destination, ulong source, long bytes) =>
        Check(_cuMemcpyDtoH(destination, source, (nuint)bytes), "cuMemcpyDtoH");

    /// <summary>Copies device → device on <paramref name="stream"/>.</summary>
    public void CopyDeviceToDevice(ulong destination, ulong source, long bytes, nint stream) =>
        Check(_cuMemcpyDtoDAsync(destination, source, (nuint)bytes, stream), "cuMemcpyDtoDAsync");

    /// <summary>Fills device memory with a byte value; returns the raw result.</summary>
    public int TryMemset(ulong destination, byte value, long bytes) => _cuMemsetD8(destination, value, (nuint)bytes);

    /// <summary>Creates an event (flags 0: timing enabled).</summary>
    public nint CreateEvent()
    {
        nint e;
        Check(_cuEventCreate(&e, 0), "cuEventCreate");
        return e;
    }

    /// <summary>Records an event on a stream.</summary>
    public void RecordEvent(nint ev, nint stream) => Check(_cuEventRecord(ev, stream), "cuEventRecord");

    /// <summary>Milliseconds between two recorded events (waits for the second).</summary>
    public float ElapsedMilliseconds(nint start, nint end)
    {
        Check(_cuEventSynchronize(end), "cuEventSynchronize");
        float ms;
        Check(_cuEventElapsedTime(&ms, start, end), "cuEventElapsedTime");
        return ms;
    }

    /// <summary>Destroys an event.</summary>
    public void DestroyEvent(nint ev) => Check(_cuEventDestroy(ev), "cuEventDestroy");

    /// <summary>The context that owns a device pointer, or the raw error code (as a negative number) if the driver does not know it.</summary>
    public nint PointerContext(ulong pointer)
    {
        nint ctx = 0;
        int r = _cuPointerGetAttribute(&ctx, PointerAttributeContext, pointer);
        return r == 0 ? ctx : -r;
    }
}
