using System.Text.Json.Nodes;
using QLora.GpuCheck;
using QLora.Kernels;

// Usage: QLora.GpuCheck [--cpu-only] [--device N] [--runs N] [--seed N] [--no-private-context] [--dump-ptx DIR]
var argList = args.ToList();
if (argList.IndexOf("--dump-ptx") is var dump and >= 0 && dump + 1 < argList.Count)
{
    Directory.CreateDirectory(argList[dump + 1]);
    foreach (var name in KernelCatalog.Names)
    {
        var k = PtxKernelCompiler.Shared.Compile(name, PtxKernelCompiler.FallbackArchitecture, PtxKernelCompiler.DefaultInstructionSet);
        File.WriteAllText(Path.Combine(argList[dump + 1], name + ".ptx"), k.Assembly);
    }
    Console.WriteLine($"wrote {KernelCatalog.Names.Count} PTX files to {argList[dump + 1]}");
}
bool cpuOnly = argList.Contains("--cpu-only");
bool privateContext = !argList.Contains("--no-private-context");
int Option(string name, int fallback)
{
    int i = argList.IndexOf(name);
    return i >= 0 && i + 1 < argList.Count && int.TryParse(argList[i + 1], out var v) ? v : fallback;
}
int ordinal = Option("--device", 0), runs = Math.Max(20, Option("--runs", 30));
int seed = Option("--seed", Environment.TickCount & 0x7FFFFFFF);

var report = new CheckReport();
report.Figures["mode"] = cpuOnly ? "cpu-only" : "gpu";
report.Figures["seed"] = seed;
report.Figures["runtime"] = System.Runtime.InteropServices.RuntimeInformation.FrameworkDescription;
Console.WriteLine($"QLora.GpuCheck: {(cpuOnly ? "CPU-only" : "GPU")} mode, seed {seed}, {runs} timed runs");

try
{
    CpuChecks.Run(report, seed);

    if (!CudaDriver.TryGetShared(out var driver, out var reason))
    {
        report.Add("cuda driver", cpuOnly ? Outcome.Skip : Outcome.Fail, reason!);
    }
    else
    {
        var launcher = CudaKernelLauncher.ForDevice(ordinal);
        int major = driver!.DeviceAttribute(launcher.Device, CudaDriver.AttributeComputeCapabilityMajor);
        int minor = driver.DeviceAttribute(launcher.Device, CudaDriver.AttributeComputeCapabilityMinor);
        string deviceName = driver.DeviceName(launcher.Device);
        report.Figures["device"] = deviceName;
        report.Figures["compute_capability"] = $"{major}.{minor}";
        report.Figures["driver_version"] = driver.DriverVersion();
        report.Figures["ptx"] = new JsonObject { ["arch"] = launcher.Architecture.ToString(), ["isa"] = launcher.InstructionSet.ToString() };
        report.Add("cuda driver", Outcome.Pass,
            $"{driver.LibraryName}: {deviceName} (sm_{major}{minor}), driver {driver.DriverVersion()}, primary context 0x{launcher.Context:X}, PTX {launcher.Architecture} / {launcher.InstructionSet}");
        if (!cpuOnly)
        {
            var checks = new GpuChecks(report, launcher, seed, runs);
            checks.LoadAllKernels();
            checks.DequantizeShape(4096, 4096);
            checks.DequantizeShape(14336, 4096);
            var cudart = CudaRuntimeLibrary.TryLoad(out var searched);
            checks.AdamW8bit(1 << 20);
            checks.RuntimeApiMemory(cudart, searched);
            if (privateContext) checks.PrivateContextHazard(cudart);
        }
    }
}
catch (Exception e)
{
    report.Add("unexpected", Outcome.Fail, e.ToString());
}

report.Print();
return report.AllPassed ? 0 : 1;
