using QLora.Kernels;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// The device a job computes on, resolved by <see cref="DeviceSelector"/>: the CPU backend, or one CUDA device whose
/// primary context (libtorch's) the project's kernels launch in. Knows how to place tensors there (<see cref="Torch"/>),
/// how to read its memory as users see it (resident anonymous memory on the CPU; the driver's used memory on CUDA),
/// how to take part of a larger card away, and how to wait for it. Jobs, data and models never learn more than this.
/// </summary>
public sealed class ComputeDevice
{
    private readonly CudaKernelLauncher? _launcher;

    private ComputeDevice(DeviceKind kind, int ordinal, string description, CudaKernelLauncher? launcher)
    {
        Kind = kind;
        Ordinal = ordinal;
        Description = description;
        _launcher = launcher;
        Torch = kind == DeviceKind.Cuda ? new Device(DeviceType.CUDA, ordinal) : new Device(DeviceType.CPU);
    }

    /// <summary>The CPU backend.</summary>
    public static ComputeDevice Cpu { get; } = new(DeviceKind.Cpu, -1, "cpu", null);

    /// <summary>Opens CUDA device <paramref name="ordinal"/>: libtorch initialises CUDA first, then the kernel launcher retains the same primary context.</summary>
    internal static ComputeDevice OpenCuda(int ordinal)
    {
        var device = new Device(DeviceType.CUDA, ordinal);
        using (zeros(1, device: device)) { } // libtorch creates (or takes) the primary context before anyone else touches it
        var launcher = CudaKernelLauncher.ForDevice(ordinal);
        launcher.MakeCurrent();
        var driver = launcher.Driver;
        var (_, total) = driver.MemoryInfo();
        string name = driver.DeviceName(launcher.Device);
        return new ComputeDevice(DeviceKind.Cuda, ordinal, $"cuda:{ordinal} ({name}, {ByteSize.Format(total)}, {launcher.Architecture}, driver {driver.DriverVersion()})", launcher);
    }

    /// <summary>CPU or CUDA.</summary>
    public DeviceKind Kind { get; }
    /// <summary>The CUDA device number, or -1 on the CPU.</summary>
    public int Ordinal { get; }
    /// <summary>True for a CUDA device.</summary>
    public bool IsCuda => Kind == DeviceKind.Cuda;
    /// <summary>PyTorch's name: <c>cpu</c> or <c>cuda:N</c>.</summary>
    public string Name => IsCuda ? $"cuda:{Ordinal}" : "cpu";
    /// <summary>The name with what the driver says about the device (model, memory, architecture, driver version).</summary>
    public string Description { get; }
    /// <summary>The TorchSharp device tensors and modules are placed on.</summary>
    public Device Torch { get; }

    /// <summary>The kernel launcher of a CUDA device (its primary context, loaded kernels, driver binding).</summary>
    public CudaKernelLauncher Launcher => _launcher ?? throw new InvalidOperationException("the CPU has no CUDA kernel launcher");

    /// <summary>
    /// Device memory in use now, as users see it: on the CPU backend the process's resident anonymous memory; on CUDA
    /// the driver's used memory of the whole device (total − free from <c>cuMemGetInfo</c>, what nvidia-smi shows:
    /// contexts, libtorch's caching allocator and any other process on the card included).
    /// </summary>
    public long UsedBytes()
    {
        if (_launcher is null) return ResidentMemory.AnonymousBytes();
        _launcher.MakeCurrent(); // the sampler reads from its own thread
        var (free, total) = _launcher.Driver.MemoryInfo();
        return total - free;
    }

    /// <summary>
    /// A sampler of <see cref="UsedBytes"/> from a baseline taken now. On CUDA it reports the peak above that baseline
    /// (the device is shared with the context, other processes and any <see cref="EmulateCapacity"/> reservation, all
    /// taken before the baseline); on the CPU the peak resident anonymous memory itself, as before.
    /// </summary>
    public PeakMemorySampler CreateMemorySampler() =>
        _launcher is null ? new PeakMemorySampler() : new PeakMemorySampler(UsedBytes, reportAboveBaseline: true);

    /// <summary>
    /// Makes a larger card behave like one of <paramref name="cardBytes"/>: allocates (<c>cuMemAlloc</c>) total − cardBytes
    /// in one block and holds it until disposed, so a job that fits a 24 GB card can be shown to fit on an 80–141 GB one.
    /// Call it before loading anything. <paramref name="what"/> names the setting and its value in messages.
    /// </summary>
    public DeviceMemoryReservation EmulateCapacity(long cardBytes, string? what = null)
    {
        what ??= $"--emulate-vram {ByteSize.Format(cardBytes)}";
        if (_launcher is null)
            throw new DeviceUnavailableException($"{what}: emulating a smaller card needs a CUDA device, and this job runs on the CPU; choose a CUDA device or drop --emulate-vram");
        if (cardBytes <= 0) throw new ArgumentException($"{what}: the emulated card size must be positive");
        _launcher.MakeCurrent();
        var driver = _launcher.Driver;
        var (free, total) = driver.MemoryInfo();
        if (cardBytes >= total)
            throw new ArgumentException($"{what}: {Name} has {ByteSize.Format(total)} in all, so there is nothing to take away; give a size below the card's");
        long take = total - cardBytes;
        if (take > free)
            throw new InvalidOperationException($"{what}: taking {ByteSize.Format(take)} away needs that much free, but {Name} has {ByteSize.Format(free)} free " +
                $"({ByteSize.Format(total - free)} already used by this or other processes); free the card or emulate a larger size");
        int r = driver.TryAllocate(take, out ulong pointer);
        if (r != 0)
            throw new InvalidOperationException($"{what}: cuMemAlloc of {ByteSize.Format(take)} on {Name} failed ({driver.ErrorName(r)}); free the card or emulate a larger size");
        return new DeviceMemoryReservation(_launcher, pointer, take);
    }

    /// <summary>Waits until the device has finished all queued work (no-op on the CPU).</summary>
    public void Synchronize()
    {
        if (IsCuda) cuda.synchronize(Torch);
    }

    /// <inheritdoc />
    public override string ToString() => Name;
}

/// <summary>A block of device memory taken away by <see cref="ComputeDevice.EmulateCapacity"/>; disposing gives it back.</summary>
public sealed class DeviceMemoryReservation : IDisposable
{
    private readonly CudaKernelLauncher _launcher;
    private ulong _pointer;

    internal DeviceMemoryReservation(CudaKernelLauncher launcher, ulong pointer, long bytes)
    {
        _launcher = launcher;
        _pointer = pointer;
        Bytes = bytes;
    }

    /// <summary>Bytes held.</summary>
    public long Bytes { get; }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_pointer == 0) return;
        _launcher.MakeCurrent();
        _launcher.Driver.Free(_pointer);
        _pointer = 0;
    }
}
