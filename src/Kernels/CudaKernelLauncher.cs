using System.Collections.Concurrent;
using ILGPU.Runtime.Cuda;
using QLora.Quant;

namespace QLora.Kernels;

/// <summary>
/// Runs this project's PTX kernels on one CUDA device inside its primary context — the context libtorch and the CUDA
/// runtime use — so kernels read and write memory torch owns. Modules are compiled (ILGPU → PTX) and loaded on first
/// use of each kernel; launches go to the legacy default stream (0), ordered with torch's default stream.
/// Never creates a context.
/// </summary>
public sealed unsafe class CudaKernelLauncher
{
    /// <summary>Threads per block for every launch.</summary>
    public const int BlockThreads = 256;

    private static readonly ConcurrentDictionary<int, Lazy<CudaKernelLauncher>> Launchers = new();
    private readonly ConcurrentDictionary<string, nint> _functions = new();
    private readonly ConcurrentDictionary<string, ulong> _tables = new();
    private readonly Lock _loadLock = new();

    /// <summary>The launcher for device <paramref name="ordinal"/>; throws <see cref="CudaUnavailableException"/> when CUDA or the device is missing.</summary>
    public static CudaKernelLauncher ForDevice(int ordinal = 0) =>
        Launchers.GetOrAdd(ordinal, o => new Lazy<CudaKernelLauncher>(() => new CudaKernelLauncher(o))).Value;

    private CudaKernelLauncher(int ordinal)
    {
        Driver = CudaDriver.Shared;
        int count = Driver.DeviceCount();
        if (ordinal < 0 || ordinal >= count)
            throw new CudaUnavailableException($"CUDA device {ordinal} was requested but the driver sees {count} device(s). Pick an ordinal below {count} (check CUDA_VISIBLE_DEVICES), or run on the CPU.");
        Ordinal = ordinal;
        Device = Driver.Device(ordinal);
        int major = Driver.DeviceAttribute(Device, CudaDriver.AttributeComputeCapabilityMajor);
        int minor = Driver.DeviceAttribute(Device, CudaDriver.AttributeComputeCapabilityMinor);
        Architecture = PtxKernelCompiler.ArchitectureFor(major, minor);
        int driverVersion = Driver.DriverVersion();
        if (!CudaAccelerator.TryGetInstructionSet(Architecture, CudaDriverVersion.FromValue(driverVersion), out var minimum, out var isa))
            throw new CudaUnavailableException($"the CUDA driver ({driverVersion}) is too old for {Architecture}: ILGPU needs driver {minimum} or newer. Update the NVIDIA driver, or run on the CPU.");
        InstructionSet = isa;
        Context = Driver.RetainPrimaryContext(Device);
    }

    /// <summary>The driver binding.</summary>
    public CudaDriver Driver { get; }

    /// <summary>The device ordinal.</summary>
    public int Ordinal { get; }

    /// <summary>The driver's device handle.</summary>
    public int Device { get; }

    /// <summary>The retained primary context (held for the life of the process).</summary>
    public nint Context { get; }

    /// <summary>The architecture kernels are compiled for.</summary>
    public CudaArchitecture Architecture { get; }

    /// <summary>The PTX ISA kernels are compiled with.</summary>
    public CudaInstructionSet InstructionSet { get; }

    /// <summary>Makes the primary context current on the calling thread if it is not already.</summary>
    public void MakeCurrent()
    {
        if (Driver.CurrentContext() != Context) Driver.SetCurrentContext(Context);
    }

    /// <summary>The loaded function of kernel <paramref name="kernelName"/> (compiled and loaded on first use).</summary>
    public nint Function(string kernelName)
    {
        if (_functions.TryGetValue(kernelName, out var fn)) return fn;
        lock (_loadLock)
        {
            if (_functions.TryGetValue(kernelName, out fn)) return fn;
            MakeCurrent();
            var ptx = PtxKernelCompiler.Shared.Compile(kernelName, Architecture, InstructionSet);
            nint module = Driver.LoadModule(ptx.Assembly);
            fn = Driver.ModuleFunction(module, ptx.EntryName);
            _functions[kernelName] = fn;
            return fn;
        }
    }

    /// <summary>Launches <paramref name="kernelName"/> over <paramref name="extent"/> threads (the first argument must be that extent) on the default stream.</summary>
    public void Launch(string kernelName, int extent, KernelArguments arguments)
    {
        if (extent <= 0) return;
        nint fn = Function(kernelName);
        MakeCurrent();
        uint grid = (uint)((extent + BlockThreads - 1) / BlockThreads);
        Driver.Check(Driver.TryLaunch(fn, grid, BlockThreads, 0, 0, arguments.Pointers), $"cuLaunchKernel({kernelName})");
    }

    /// <summary>A device copy of a constant float table (the 4-bit tables, the 8-bit maps), uploaded once.</summary>
    public ulong Table(string key, ReadOnlySpan<float> values)
    {
        if (_tables.TryGetValue(key, out var p)) return p;
        lock (_loadLock)
        {
            if (_tables.TryGetValue(key, out p)) return p;
            MakeCurrent();
            p = Driver.Allocate(values.Length * sizeof(float));
            fixed (float* v = values) Driver.CopyToDevice(p, v, values.Length * sizeof(float));
            _tables[key] = p;
            return p;
        }
    }

    /// <summary>The device copy of a 4-bit code table.</summary>
    public ulong CodeTable(QuantType type) => Table(type.Name(), type.Table());

    /// <summary>Waits for every kernel launched in the primary context.</summary>
    public void Synchronize()
    {
        MakeCurrent();
        Driver.Synchronize();
    }
}
