using System.Diagnostics;
using System.Text.Json.Nodes;

namespace QLora.Cli.Tests;

/// <summary>
/// The GPU check's pieces that can be checked without a GPU: the shell scripts parse, and scripts/shim-symbols.py
/// reads the ELF tables right — the shim of this build needs nothing the CPU libtorch it loads against lacks (the other
/// tests prove it loads), while a folder without libc10.so lacks c10's symbols.
/// </summary>
public sealed class GpuCheckScriptTests
{
    private static readonly string Native = Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native");

    private static string RepoRoot()
    {
        var dir = AppContext.BaseDirectory;
        while (!File.Exists(Path.Combine(dir, "QLora.sln"))) dir = Path.GetDirectoryName(dir)!;
        return dir;
    }

    private static (int Code, string Stdout, string Stderr) Run(string file, params string[] args)
    {
        var start = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) start.ArgumentList.Add(a);
        using var p = Process.Start(start)!;
        var o = p.StandardOutput.ReadToEndAsync();
        var e = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(2))) { p.Kill(true); throw new TimeoutException(file); }
        return (p.ExitCode, o.Result, e.Result);
    }

    private static bool Exists(string command) => Environment.GetEnvironmentVariable("PATH")!.Split(':').Any(d => File.Exists(Path.Combine(d, command)));

    [SkippableFact]
    public void ScriptsParse()
    {
        Skip.IfNot(OperatingSystem.IsLinux() && Exists("bash"), "needs bash");
        foreach (var script in new[] { "gpu-check.sh", "publish-gpu-check.sh" })
        {
            var (code, _, err) = Run("bash", "-n", Path.Combine(RepoRoot(), "scripts", script));
            Assert.True(code == 0, script + ": " + err);
        }
    }

    [SkippableFact]
    public void ShimSymbolCheckFindsWhatALibTorchFolderLacks()
    {
        Skip.IfNot(OperatingSystem.IsLinux() && Exists("python3") && File.Exists(Path.Combine(Native, "libtorch_cpu.so")), "needs python3 and the linux-x64 CPU libtorch of the test build");
        var script = Path.Combine(RepoRoot(), "scripts", "shim-symbols.py");
        var shim = Path.Combine(Native, "libLibTorchSharp.so");

        var (code, stdout, stderr) = Run("python3", script, shim, Native);
        Assert.True(code == 0, stdout + stderr);
        var ok = JsonNode.Parse(stdout)!;
        Assert.True((bool)ok["ok"]!);
        Assert.True((int)ok["needed"]! > 500);

        using var dir = new TempDir();
        foreach (var f in new[] { "libtorch.so", "libtorch_cpu.so" }) File.CreateSymbolicLink(dir[f], Path.Combine(Native, f));
        var missing = Run("python3", script, shim, dir.Path);
        Assert.Equal(1, missing.Code);
        var json = JsonNode.Parse(missing.Stdout)!;
        Assert.False((bool)json["ok"]!);
        var names = json["missing"]!.AsArray().Select(n => (string)n!).ToList();
        Assert.NotEmpty(names);
        Assert.All(names, n => Assert.Matches("c10|caffe2", n)); // only what libc10.so defines (c10::, caffe2::TypeMeta) is gone
    }
}
