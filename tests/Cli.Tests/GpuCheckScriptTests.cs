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

    /// <summary>
    /// The GPU branch of the script, which no GPU has run yet, driven here by stand-ins that print what the real programs
    /// print on a GPU (a qlora, the kernel check, the shim check and the PyTorch peer as small scripts): every step must
    /// read its figures and judge them against its target, passing what meets it and failing what does not.
    /// </summary>
    [SkippableFact]
    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    public void OnAGpuEveryStepJudgesItsFiguresAgainstItsTarget()
    {
        Skip.IfNot(OperatingSystem.IsLinux() && Exists("bash") && Exists("python3") && Exists("timeout"), "needs bash, python3 and timeout");
        using var dir = new TempDir();
        var bundle = Directory.CreateDirectory(dir["bundle"]).FullName;
        Directory.CreateDirectory(Path.Combine(bundle, "app"));
        Directory.CreateDirectory(Path.Combine(bundle, "peer"));
        Directory.CreateDirectory(Path.Combine(bundle, "quickstart"));
        File.Copy(Path.Combine(RepoRoot(), "scripts", "gpu-check.sh"), Path.Combine(bundle, "gpu-check.sh"));
        var lib = Directory.CreateDirectory(Path.Combine(dir.Path, "torch", "lib")).FullName;
        foreach (var f in new[] { "libtorch_cpu.so", "libtorch_cuda.so", "libtorch.so", "libc10.so" }) File.WriteAllText(Path.Combine(lib, f), "");
        File.WriteAllText(Path.Combine(dir.Path, "torch", "version.py"), "__version__ = '2.11.0+cu130'\n");

        string qlora = """
            #!/usr/bin/env bash
            args="$*"
            case "$args" in
              *--help*) case "$args" in "bench --help") echo "  nccl  The NCCL all-reduce";; *) echo "  --device  --emulate-vram";; esac ;;
              doctor*) echo '{"verb":"doctor","healthy":true,"libtorch":{"version":"2.11.0","directory":"LIB"},"cuda_available":true,"devices":[{"name":"NVIDIA H200","memory_bytes":150000000000,"compute_capability":"9.0","ptx":"sm_90"}],"self_check":[{"name":"matmul","device":"cuda","passed":true}],"findings":[]}' ;;
              train*) echo '{"steps":300,"eval_loss":0.0665,"exact_match_after":0.96,"tokens_per_s":41000}' ;;
              "bench train"*) echo '{"bench":"train","device":"cuda:0","tokens_per_s":9000,"mfu":0.45,"matmul_gflops":700000,"dequant_overhead":1.05}' ;;
              "bench memory"*--stream*) echo '{"bench":"memory","measured_peak_bytes":8500000000,"planned_peak_bytes":10000000000,"measured_over_planned":0.85,"step_s":20}' ;;
              "bench memory"*) echo '{"bench":"memory","measured_peak_bytes":10400000000,"planned_peak_bytes":10000000000,"measured_over_planned":1.04,"step_s":2}' ;;
              "bench nccl"*) echo '{"bench":"nccl","device":"cuda:0","ranks":1,"bytes":167772160,"allreduce_s":0.0004,"algbw_gbps":400,"busbw_gbps":0,"exact":true,"mismatches":0,"nccl":"NCCL 2.27.5","nccl_library":"libnccl.so.2"}' ;;
              *) echo "stand-in qlora: unexpected $args" >&2; exit 3 ;;
            esac
            """.Replace("LIB", lib);
        WriteExecutable(Path.Combine(bundle, "app", "qlora"), qlora);
        WriteExecutable(Path.Combine(bundle, "app", "QLora.GpuCheck"), """
            #!/usr/bin/env bash
            echo '{"mode":"gpu","passed":true,"checks":{"bit identity":"pass","bandwidth":"pass"},"dequant_4096x4096":{"ratio":0.86},"dequant_14336x4096":{"ratio":0.88}}'
            """);
        File.WriteAllText(Path.Combine(bundle, "shim-symbols.py"), "import json\nprint(json.dumps({'ok': True, 'needed': 1314, 'missing_count': 0, 'missing': []}))\n");
        File.WriteAllText(Path.Combine(bundle, "peer", "lora_step.py"), "import json\nprint(json.dumps({'peer': 'pytorch', 'torch': '2.11.0', 'peft': '0.17.0', 'tokens_per_s': 9500}))\n");

        var start = new ProcessStartInfo("bash") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { Path.Combine(bundle, "gpu-check.sh"), "--libtorch", lib, "--logs", dir["logs"], "--cpu-eval-loss", "0.066" }) start.ArgumentList.Add(a);
        start.Environment.Remove("OUT");
        using var p = Process.Start(start)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        Assert.True(p.WaitForExit(TimeSpan.FromMinutes(3)), "gpu-check.sh did not finish");
        var summary = JsonNode.Parse(File.ReadAllText(Path.Combine(dir["logs"], "summary.json")))!;
        var checks = summary["checks"]!.AsObject().ToDictionary(kv => kv.Key, kv => (string)kv.Value!);
        var expected = new Dictionary<string, string>
        {
            ["host"] = "info", ["libtorch"] = "info", ["shim-symbols"] = "pass", ["doctor"] = "pass", ["kernels"] = "pass",
            ["quickstart"] = "pass",   // exact match 0.96 >= 0.9, eval loss 0.0665 within 3 % of 0.066
            ["bench-train"] = "pass",  // MFU 0.45 >= 0.40, overhead 1.05 <= 1.10
            ["peer"] = "pass",         // 9000 / 9500 = 0.947 >= 0.9
            ["memory-8b"] = "pass",    // 1.04 within +-10 %
            ["memory-70b-stream"] = "fail", // 0.85: 15 % below the plan
            ["nccl"] = "pass",
        };
        Assert.True(expected.Count == checks.Count && expected.All(kv => checks.GetValueOrDefault(kv.Key) == kv.Value),
            $"checks: {summary["checks"]}\n{stdout.Result}\n{stderr.Result}");
        Assert.Equal(1, p.ExitCode); // a failed step fails the script
        var rows = File.ReadAllLines(Path.Combine(dir["logs"], "results.jsonl")).Select(l => JsonNode.Parse(l)!).ToDictionary(r => (string)r["check"]!);
        Assert.Contains("ours / PyTorch = 0.947", (string)rows["peer"]["detail"]!);
        Assert.Contains("version 2.11.0+cu130", (string)rows["libtorch"]["detail"]!);
    }

    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    private static void WriteExecutable(string path, string text)
    {
        File.WriteAllText(path, text.ReplaceLineEndings("\n") + "\n");
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
    }
}
