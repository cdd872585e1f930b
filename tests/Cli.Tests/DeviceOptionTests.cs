using System.Text.Json.Nodes;
using QLora.Kernels;
using QLora.Trainer;

namespace QLora.Cli.Tests;

/// <summary>The device switch on every verb, on a machine without a usable GPU (the GPU cases skip elsewhere).</summary>
public class DeviceOptionTests
{
    static bool CudaUsable => TorchSharp.torch.cuda.is_available() && DeviceSelector.Diagnose(0).Count == 0;

    static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "QLora.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("QLora.sln not found above the test binaries");
    }

    [SkippableFact]
    public void TrainingOnCudaWithoutOneStopsInOneLineBeforeTouchingTheOutput()
    {
        Skip.If(CudaUsable, "CUDA is usable here");
        using var tmp = new TempDir();
        var r = CliRunner.Run("train", "--config", Path.Combine(RepoRoot(), "appsettings.json"), "--Model:Device", "cuda", "--Output:Dir", tmp["out"]);
        Assert.Equal(1, r.ExitCode);
        Assert.Single(r.Stderr.TrimEnd().Split('\n'));
        Assert.StartsWith("qlora train: Model:Device cuda:0: CUDA cannot be used here: ", r.Stderr);
        Assert.Contains("Model:Device cpu", r.Stderr);
        Assert.False(Directory.Exists(tmp["out"]));
    }

    [Fact]
    public void AnUnknownDeviceIsAJobError()
    {
        var r = CliRunner.Run("train", "--config", Path.Combine(RepoRoot(), "appsettings.json"), "--Model:Device", "gpu0");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("Model:Device = 'gpu0': allowed values are auto", r.Stderr);
    }

    [Fact]
    public void EmulatingVramOnTheCpuIsRefused()
    {
        using var tmp = new TempDir();
        var r = CliRunner.Run("train", "--config", Path.Combine(RepoRoot(), "appsettings.json"), "--Model:Device", "cpu", "--emulate-vram", "24GB",
            "--Output:Dir", tmp["out"]);
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("--emulate-vram 24GB: emulating a smaller card needs a CUDA device", r.Stderr);
        Assert.False(Directory.Exists(tmp["out"]));
    }

    [Fact]
    public void PlanningForCudaAddsTheContextAndWorkspaces()
    {
        var cpu = JsonNode.Parse(CliRunner.Run("plan", "--model", "llama-3.1-8b", "--device", "cpu").LastLine)!;
        var gpu = CliRunner.Run("plan", "--model", "llama-3.1-8b", "--device", "cuda");
        Assert.True(gpu.ExitCode == 0, gpu.Stderr);
        var json = JsonNode.Parse(gpu.LastLine)!;
        Assert.Equal("cuda", json["device"]!.GetValue<string>());
        Assert.Equal("cpu", cpu["device"]!.GetValue<string>());
        Assert.Equal(PlanOptions.CudaContextBytes + PlanOptions.CudaWorkspaceBytes, json["components"]!["framework_overhead"]!.GetValue<long>());
        Assert.Contains("CUDA context", gpu.Stdout);
        Assert.Equal(1, CliRunner.Run("plan", "--model", "llama-3.1-8b", "--device", "tpu").ExitCode);
    }

    [SkippableFact]
    public void BenchmarksAskedForCudaWithoutOneSayWhatIsMissing()
    {
        Skip.If(CudaDriver.TryGetShared(out _, out _), "an NVIDIA driver is present here");
        var dequant = CliRunner.Run("bench", "dequant", "--device", "cuda", "--weights", "1024", "--repeats", "1");
        Assert.Equal(1, dequant.ExitCode);
        Assert.Single(dequant.Stderr.TrimEnd().Split('\n'));
        Assert.Contains("--device cuda:0", dequant.Stderr);
        Assert.Contains("NVIDIA driver", dequant.Stderr);
        var train = CliRunner.Run("bench", "train", "--device", "cuda:1", "--layers", "1", "--steps", "1");
        Assert.Equal(1, train.ExitCode);
        Assert.StartsWith("qlora bench train: --device cuda:1: CUDA cannot be used here", train.Stderr);
        var memory = CliRunner.Run("bench", "memory", "--preset", "llama-3.1-8b", "--device", "cuda", "--emulate-vram", "24GB");
        Assert.Equal(1, memory.ExitCode);
        Assert.Contains("CUDA cannot be used here", memory.Stderr);
        using var tmp = new TempDir();
        var generate = CliRunner.Run("generate", "--model", tmp.Path, "--prompt", "hi", "--device", "cuda");
        Assert.Equal(1, generate.ExitCode);
        Assert.Contains("--device cuda:0: CUDA cannot be used here", generate.Stderr);
    }

    [Fact]
    public void DequantOnTheCpuStillMeasuresAndNamesItsDevice()
    {
        var r = CliRunner.Run("bench", "dequant", "--device", "cpu", "--weights", "65536", "--repeats", "1");
        Assert.True(r.ExitCode == 0, r.Stderr);
        Assert.Equal("cpu", JsonNode.Parse(r.LastLine)!["device"]!.GetValue<string>());
    }
}
