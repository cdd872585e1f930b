using System.Diagnostics;
using QLora.Kernels;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Resolves a device setting (<c>Model:Device</c>, <c>--device</c>) to a <see cref="ComputeDevice"/>: <c>auto</c> is the
/// first CUDA device when the NVIDIA driver, a CUDA build of libtorch and a device are all there, else the CPU;
/// <c>cuda</c>/<c>cuda:N</c> is that device or one line saying what is missing and what to do; <c>cpu</c> touches
/// nothing CUDA at all. Under an MPI launcher, <c>auto</c> and plain <c>cuda</c> give each rank the device of its
/// local rank (modulo the devices it sees), so ranks on one machine spread over its GPUs; <c>cuda:N</c> is kept as given.
/// </summary>
public static class DeviceSelector
{
    /// <summary>Parses and resolves <paramref name="setting"/>; <paramref name="what"/> names it in messages (e.g. <c>Model:Device</c>).</summary>
    /// <exception cref="ArgumentException">Not a device name.</exception>
    /// <exception cref="DeviceUnavailableException">CUDA asked for and not usable here.</exception>
    public static ComputeDevice Resolve(string? setting, string what = "--device", Action<string>? log = null) =>
        Resolve(DeviceRequest.Parse(setting, what), what, log);

    /// <summary>Resolves a parsed request (see <see cref="Resolve(string?, string, Action{string}?)"/>).</summary>
    public static ComputeDevice Resolve(DeviceRequest request, string what = "--device", Action<string>? log = null)
    {
        switch (request.Kind)
        {
            case DeviceRequestKind.Cpu:
                return ComputeDevice.Cpu;
            case DeviceRequestKind.Auto:
            {
                // Cheapest test first: a CPU-only libtorch cannot use a GPU whatever the driver says.
                if (!cuda.is_available() && !LibTorchHasCuda()) return ComputeDevice.Cpu;
                int ordinal = RankOrdinal();
                var problems = Diagnose(ordinal);
                if (problems.Count == 0) return Open(ordinal, request, what);
                log?.Invoke($"{what} auto: running on the CPU because CUDA is not usable: {string.Join("; ", problems)}");
                return ComputeDevice.Cpu;
            }
            default:
            {
                int ordinal = request.Indexed ? request.Ordinal : RankOrdinal();
                var problems = Diagnose(ordinal);
                if (problems.Count > 0)
                    throw new DeviceUnavailableException($"{what} cuda:{ordinal}: CUDA cannot be used here: {string.Join("; ", problems)}. Fix that, or run on the CPU ({what} cpu).");
                return Open(ordinal, request, what);
            }
        }
    }

    /// <summary>The device an unnumbered request takes: this MPI rank's local rank modulo the devices the driver sees, else 0.</summary>
    static int RankOrdinal() =>
        MpiLaunch.LocalRank is int local && local > 0 && CudaDriver.TryGetShared(out var driver, out _) && driver!.DeviceCount() is int count && count > 0
            ? local % count : 0;

    /// <summary>
    /// The device kind a plan is made for, without opening anything: cpu and cuda as asked (a GPU job can be planned on
    /// any machine), auto as this machine would resolve it (CUDA when libtorch can use a device).
    /// </summary>
    public static DeviceKind PlanTarget(DeviceRequest request) => request.Kind switch
    {
        DeviceRequestKind.Cpu => DeviceKind.Cpu,
        DeviceRequestKind.Cuda => DeviceKind.Cuda,
        _ => cuda.is_available() ? DeviceKind.Cuda : DeviceKind.Cpu,
    };

    private static ComputeDevice Open(int ordinal, DeviceRequest request, string what)
    {
        try
        {
            return ComputeDevice.OpenCuda(ordinal);
        }
        catch (Exception e) when (e is CudaUnavailableException or CudaException or System.Runtime.InteropServices.ExternalException)
        {
            throw new DeviceUnavailableException($"{what} {request}: opening cuda:{ordinal} failed: {OneLine(e.Message)}. Run on the CPU ({what} cpu) or check the device with nvidia-smi.", e);
        }
    }

    /// <summary>
    /// What stops CUDA device <paramref name="ordinal"/> from being used, one entry per missing piece (driver, CUDA
    /// libtorch, device), each with what to do; empty when it can be used.
    /// </summary>
    public static IReadOnlyList<string> Diagnose(int ordinal)
    {
        var problems = new List<string>();
        bool driverOk = CudaDriver.TryGetShared(out var driver, out var reason);
        if (!driverOk) problems.Add($"no usable NVIDIA driver ({FirstSentence(reason)}; install the NVIDIA driver, which provides libcuda.so.1)");
        bool torchCuda = LibTorchHasCuda();
        bool torchSees = torchCuda && cuda.is_available();
        if (!torchCuda)
            problems.Add("the loaded libtorch is a CPU build (no libtorch_cuda in this process; point QLORA_LIBTORCH or --libtorch at the torch/lib folder of a CUDA PyTorch installation)");
        else if (driverOk && !torchSees)
            problems.Add("libtorch's CUDA runtime sees no device (its CUDA version may need a newer driver than this one; update the driver or use a matching PyTorch)");
        if (driverOk)
        {
            int count = driver!.DeviceCount();
            if (ordinal >= count)
            {
                var names = Enumerable.Range(0, count).Select(i => $"cuda:{i} {driver.DeviceName(driver.Device(i))}");
                problems.Add($"there is no CUDA device {ordinal}: the driver sees {count} ({string.Join(", ", names)}; check CUDA_VISIBLE_DEVICES)");
            }
        }
        return problems;
    }

    /// <summary>True when a CUDA build of libtorch (<c>libtorch_cuda</c>) is loaded in this process.</summary>
    public static bool LibTorchHasCuda()
    {
        try
        {
            using var self = Process.GetCurrentProcess();
            foreach (ProcessModule m in self.Modules)
                if (m.ModuleName.Contains("torch_cuda", StringComparison.OrdinalIgnoreCase)) return true;
        }
        catch (Exception e) when (e is InvalidOperationException or NotSupportedException or System.ComponentModel.Win32Exception) { }
        return false;
    }

    private static string FirstSentence(string? text)
    {
        if (string.IsNullOrEmpty(text)) return "unknown reason";
        int end = text.IndexOf(". ", StringComparison.Ordinal);
        return (end < 0 ? text : text[..end]).TrimEnd('.');
    }

    private static string OneLine(string text) => text.ReplaceLineEndings(" ").TrimEnd('.');
}
