using System.CommandLine;
using QLora.Trainer.Runtime;

namespace QLora.Cli;

/// <summary><c>qlora doctor</c>: what this machine offers the trainer and what is missing, ending with one JSON line.</summary>
internal static class DoctorVerb
{
    public static Command Create(TextWriter stdout)
    {
        var command = new Command("doctor",
            "Explains this machine: OS, .NET, TorchSharp, which libtorch is loaded from where and its version, CUDA, devices " +
            "(name, memory, compute capability, driver), the kernels' PTX target, a libtorch self-check, and what is missing. " +
            "Exit code 1 when something is broken (a machine without a GPU is not broken).");
        command.SetAction(_ => Run(stdout));
        return command;
    }

    private static int Run(TextWriter o)
    {
        var r = RuntimeDoctor.Examine();
        var p = r.Preload;
        o.WriteLine($"os          {r.Os}");
        o.WriteLine($".NET        {r.DotNet}");
        o.WriteLine($"TorchSharp  {r.TorchSharp} (shim built for libtorch {LibTorchVersion.Shim.Text})");
        o.WriteLine($"libtorch    {RuntimeDoctor.Describe(p)}" + (p.Version != null ? $", version {p.Version.Text}" + (p.Version.SourceFile != "bundled package" ? $" ({p.Version.SourceFile})" : "") : ", version unknown")
                    + (p.HasCudaLibraries ? ", with CUDA libraries" : ""));
        foreach (var file in r.MappedLibraries) o.WriteLine($"  mapped    {file}");
        o.WriteLine($"CUDA        {(r.CudaAvailable is { } a ? (a ? $"available to torch, {r.CudaDeviceCount} device(s)" : "not available to torch") : "not asked (libtorch unusable)")}");
        o.WriteLine($"driver      {(r.DriverLibrary != null ? $"{r.DriverLibrary}, CUDA {r.DriverVersion / 1000}.{r.DriverVersion % 1000 / 10}" : "none")}");
        foreach (var d in r.Devices)
            o.WriteLine($"  cuda:{d.Ordinal}    {d.Name}, {d.MemoryBytes / (1024.0 * 1024 * 1024):F1} GiB, compute {d.ComputeCapability}, {d.Multiprocessors} SMs, kernels: {d.PtxTarget}");
        if (r.Devices.Count > 0) o.WriteLine($"nccl        {r.Nccl ?? "not found (see below)"}");
        if (r.Devices.Count == 0) o.WriteLine($"kernels     PTX {r.PtxFallback}, when a device appears");
        foreach (var f in r.Platform) o.WriteLine($"{f.Name,-11} {f.Value}");
        o.WriteLine($"console     {(ConsoleAnsi.Supported ? "ANSI escape codes" : "no ANSI escape codes: the progress bar redraws with spaces")}");
        foreach (var s in r.SelfCheck) o.WriteLine($"self-check  {(s.Passed ? "ok  " : "FAIL")} {s.Name} on {s.Device}: {s.Detail}");
        foreach (var f in r.Findings) o.WriteLine($"{(f.IsError ? "error" : "note "),-11} {f.What}" + (f.ToDo.Length > 0 ? $"; to do: {f.ToDo}" : ""));
        o.WriteLine(r.Healthy ? "doctor: nothing broken" : "doctor: something is broken (see the errors above)");
        o.WriteLine(Json.Line(new
        {
            verb = "doctor",
            healthy = r.Healthy,
            os = r.Os,
            dotnet = r.DotNet,
            torchsharp = r.TorchSharp,
            shim_libtorch = LibTorchVersion.Shim.Text,
            libtorch = new
            {
                source = p.Source.ToString().ToLowerInvariant(),
                directory = p.Directory,
                version = p.Version?.Text,
                version_file = p.Version?.SourceFile,
                cuda_libraries = p.HasCudaLibraries,
                self_check_required = p.SelfCheckRequired,
                loaded = p.Loaded,
                mapped = r.MappedLibraries,
                error = p.Error,
            },
            cuda_available = r.CudaAvailable,
            cuda_device_count = r.CudaDeviceCount,
            driver = r.DriverLibrary == null ? null : new { library = r.DriverLibrary, cuda_version = r.DriverVersion },
            nccl = r.Nccl,
            devices = r.Devices.Select(d => new { ordinal = d.Ordinal, name = d.Name, memory_bytes = d.MemoryBytes, compute_capability = d.ComputeCapability, sms = d.Multiprocessors, ptx = d.PtxTarget }),
            ptx_fallback = r.PtxFallback,
            self_check = r.SelfCheck.Select(s => new { name = s.Name, device = s.Device, passed = s.Passed, detail = s.Detail }),
            findings = r.Findings.Select(f => new { error = f.IsError, what = f.What, to_do = f.ToDo }),
            platform = r.Platform.ToDictionary(f => f.Name.Replace(' ', '_'), f => f.Value),
            wine = PlatformFacts.WineVersion(),
            console_ansi = ConsoleAnsi.Supported,
        }));
        return r.Healthy ? 0 : 1;
    }
}
