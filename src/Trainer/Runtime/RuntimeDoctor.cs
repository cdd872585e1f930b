using System.Reflection;
using System.Runtime.InteropServices;
using ILGPU.Runtime.Cuda;
using QLora.Kernels;
using TorchSharp;

namespace QLora.Trainer.Runtime;

/// <summary>One CUDA device as the driver describes it, with the PTX target this project's kernels compile for on it.</summary>
public sealed record DoctorDevice(int Ordinal, string Name, long MemoryBytes, string ComputeCapability, int Multiprocessors, string PtxTarget);

/// <summary>Something missing or wrong, and what to do about it. Errors make the doctor fail; notes are capabilities absent here.</summary>
public sealed record DoctorFinding(bool IsError, string What, string ToDo);

/// <summary>What <c>qlora doctor</c> found.</summary>
public sealed record DoctorReport(
    string Os, string DotNet, string TorchSharp, LibTorchPreload Preload, IReadOnlyList<string> MappedLibraries,
    bool? CudaAvailable, int CudaDeviceCount, string? DriverLibrary, int? DriverVersion, IReadOnlyList<DoctorDevice> Devices,
    string PtxFallback, IReadOnlyList<SelfCheckLine> SelfCheck, IReadOnlyList<DoctorFinding> Findings,
    IReadOnlyList<PlatformFact> Platform, string? Nccl = null)
{
    /// <summary>True when nothing is broken (a machine without a GPU can be healthy).</summary>
    public bool Healthy => Findings.All(f => !f.IsError);
}

/// <summary>
/// Explains the machine to a user before they train: the OS and runtime, which libtorch the process runs on and where
/// it was loaded from (the preload's decision and the files the process really mapped), whether torch sees CUDA, the
/// devices as the NVIDIA driver describes them, the PTX target of the kernels, a self-check of the libtorch, and what is
/// missing with what to do. What <c>python -m bitsandbytes</c> and <c>torch.utils.collect_env</c> give Python users.
/// Touches <c>torch</c> only when the preload left it usable.
/// </summary>
public static class RuntimeDoctor
{
    /// <summary>Examines this process and machine.</summary>
    public static DoctorReport Examine()
    {
        var findings = new List<DoctorFinding>();
        var preload = LibTorchPreload.Current ?? LibTorchPreload.Prepare([], _ => null, LibTorchPreload.AppFolders());
        string torchSharp = typeof(torch).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion.Split('+')[0]
                            ?? typeof(torch).Assembly.GetName().Version?.ToString() ?? "?";

        // The driver, independent of torch.
        var devices = new List<DoctorDevice>();
        string? driverLibrary = null;
        int? driverVersion = null;
        string ptxFallback = $"{Ptx(PtxKernelCompiler.FallbackArchitecture)} / ISA {PtxKernelCompiler.DefaultInstructionSet} (newer GPUs JIT it)";
        if (CudaDriver.TryGetShared(out var driver, out var driverReason))
        {
            driverLibrary = driver!.LibraryName;
            driverVersion = driver.DriverVersion();
            for (int i = 0; i < driver.DeviceCount(); i++)
            {
                int d = driver.Device(i);
                int major = driver.DeviceAttribute(d, CudaDriver.AttributeComputeCapabilityMajor);
                int minor = driver.DeviceAttribute(d, CudaDriver.AttributeComputeCapabilityMinor);
                var arch = PtxKernelCompiler.ArchitectureFor(major, minor);
                string target = CudaAccelerator.TryGetInstructionSet(arch, CudaDriverVersion.FromValue(driverVersion.Value), out var minimum, out var isa)
                    ? $"{Ptx(arch)} / ISA {isa}" + (arch.Major != major || arch.Minor != minor ? $" (JIT-compiled by the driver for sm_{major}{minor})" : "")
                    : $"none: driver {driverVersion} is older than ILGPU needs for {Ptx(arch)} ({minimum})";
                if (target.StartsWith("none", StringComparison.Ordinal))
                    findings.Add(new DoctorFinding(true, $"device {i}: the kernels cannot be compiled for it ({target})", "update the NVIDIA driver"));
                devices.Add(new DoctorDevice(i, driver.DeviceName(d), driver.DeviceTotalMemory(d), $"{major}.{minor}",
                    driver.DeviceAttribute(d, CudaDriver.AttributeMultiprocessorCount), target));
            }
        }
        else
        {
            findings.Add(new DoctorFinding(false, $"no usable NVIDIA GPU: {driverReason!.TrimEnd('.')}", "training runs on the CPU (device cpu); for a GPU install the NVIDIA driver and check nvidia-smi"));
        }

        // libtorch, only when the preload left it usable.
        bool? cudaAvailable = null;
        int cudaCount = 0;
        var selfCheck = new List<SelfCheckLine>();
        var mapped = new List<string>();
        if (!preload.Usable)
        {
            findings.Add(new DoctorFinding(true, "libtorch: " + preload.Error, ""));
        }
        else
        {
            try
            {
                cudaAvailable = torch.cuda.is_available();
                cudaCount = cudaAvailable == true ? torch.cuda.device_count() : 0;
                selfCheck.AddRange(LibTorchSelfCheck.Run(cudaAvailable == true));
                foreach (var line in selfCheck.Where(l => !l.Passed))
                    findings.Add(new DoctorFinding(true, $"self-check {line.Name} on {line.Device} failed: {line.Detail}",
                        $"use a libtorch {LibTorchVersion.Shim.Major}.{LibTorchVersion.Shim.Minor} (this build's shim) and report the failure"));
            }
            catch (Exception e)
            {
                findings.Add(new DoctorFinding(true, $"libtorch did not load or run: {e.GetBaseException().Message.ReplaceLineEndings(" ")}",
                    "check the libtorch folder (qlora doctor with LD_BIND_NOW=1 names a missing symbol), or use a libtorch matching the shim"));
            }
            if (preload.SelfCheckRequired)
                findings.Add(new DoctorFinding(false, $"libtorch {preload.Version?.Text ?? "of unknown version"} differs from the shim's {LibTorchVersion.Shim.Text} ({LibTorchPreload.AllowMismatchVariable}=1)",
                    "every run starts with the self-check; prefer a matching libtorch"));
            if (driverLibrary != null && devices.Count > 0 && cudaAvailable == false)
                findings.Add(preload.HasCudaLibraries
                    ? new DoctorFinding(true, "the libtorch has CUDA libraries but torch does not see the GPU", "check that the driver supports this PyTorch's CUDA version (nvidia-smi) and CUDA_VISIBLE_DEVICES")
                    : new DoctorFinding(false, $"a GPU is present but the libtorch in use is CPU-only ({Describe(preload)})",
                        $"run a qlora published with -p:TorchBackend=external with {LibTorchPreload.EnvironmentVariable}=<a CUDA PyTorch installation's torch/lib> (scripts/publish-gpu-check.sh)"));
        }
        // NCCL matters only with a GPU: data-parallel CUDA ranks sum their gradients with it.
        string? nccl = null;
        if (devices.Count > 0)
        {
            var library = NcclLibrary.TryLoad(preload.Directory is { } dir ? [dir] : [], out var ncclReason);
            if (library is not null) nccl = $"NCCL {library.Version} ({library.Source})";
            else findings.Add(new DoctorFinding(false, $"NCCL: {ncclReason}", "data-parallel CUDA ranks then sum their gradients through host memory over MPI (one GPU needs no NCCL)"));
        }
        mapped.AddRange(MappedLibraries());
        return new DoctorReport(RuntimeInformation.OSDescription + " " + RuntimeInformation.OSArchitecture, RuntimeInformation.FrameworkDescription,
            torchSharp, preload, mapped, cudaAvailable, cudaCount, driverLibrary, driverVersion, devices, ptxFallback, selfCheck, findings,
            PlatformFacts.Collect(), nccl);
    }

    /// <summary>Where the libtorch in use comes from, in words.</summary>
    public static string Describe(LibTorchPreload p) => p.Source switch
    {
        LibTorchSource.Bundled => $"bundled CPU libtorch in {p.Directory}",
        LibTorchSource.Environment => $"{p.Directory} (from {LibTorchPreload.EnvironmentVariable})",
        LibTorchSource.CommandLine => $"{p.Directory} (from {LibTorchPreload.Option})",
        _ => "none",
    };

    /// <summary>
    /// The libtorch and shim files this process has mapped (Linux: /proc/self/maps; Windows: the loaded modules), which
    /// is where they really came from.
    /// </summary>
    public static IReadOnlyList<string> MappedLibraries()
    {
        var names = LibTorchFiles.All.Append(LibTorchFiles.Shim).ToHashSet();
        if (OperatingSystem.IsWindows()) return PlatformFacts.LoadedModules(names);
        const string maps = "/proc/self/maps";
        if (!File.Exists(maps)) return [];
        return File.ReadLines(maps).Select(l => l.IndexOf('/') is var i and >= 0 ? l[i..] : null)
            .Where(p => p != null && names.Contains(Path.GetFileName(p))).Distinct().Order(StringComparer.Ordinal).ToList()!;
    }

    private static string Ptx(CudaArchitecture arch) => $"sm_{arch.Major}{arch.Minor}";
}
