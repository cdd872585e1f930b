using System.Diagnostics;
using System.Text.Json.Nodes;

namespace QLora.Cli.Tests;

/// <summary>
/// The libtorch preload end to end, in fresh <c>qlora</c> processes (the preload runs once, at process start):
/// an external-mode layout of this build (qlora and its managed dependencies and the shim, no libtorch, no deps.json)
/// runs on a separate copy of the CPU libtorch laid out like a PyTorch installation (site-packages/torch/lib +
/// torch/version.py), and the normal build (which ships libtorch) refuses to mix in another one.
/// </summary>
public sealed class ExternalLibTorchTests : IDisposable
{
    private readonly TempDir _dir = new();
    private static readonly string Bin = AppContext.BaseDirectory;
    private static readonly string Native = Path.Combine(Bin, "runtimes", "linux-x64", "native");

    public void Dispose() => _dir.Dispose();

    /// <summary>Hard links (same file system) or copies: the 460 MB libtorch_cpu.so is not copied when it can be linked.</summary>
    private static void Link(string from, string to)
    {
        if (LinkNative(from, to) != 0) File.Copy(from, to);
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "link", SetLastError = true)]
    private static extern int LinkNative(string oldPath, string newPath);

    private string FakePyTorch(string version)
    {
        var torch = _dir["site-packages/torch"];
        var lib = Path.Combine(torch, "lib");
        Directory.CreateDirectory(lib);
        foreach (var f in Directory.GetFiles(Native).Where(f => Path.GetFileName(f) is var n && (n.StartsWith("libc10") || n.StartsWith("libtorch") || n.StartsWith("libgomp"))))
            Link(f, Path.Combine(lib, Path.GetFileName(f)));
        File.WriteAllText(Path.Combine(torch, "version.py"), $"__version__ = '{version}'\ndebug = False\ncuda: Optional[str] = None\n");
        return lib;
    }

    private string ExternalLayout()
    {
        var app = _dir["app"];
        Directory.CreateDirectory(app);
        foreach (var f in Directory.GetFiles(Bin).Where(f => f.EndsWith(".dll") || f.EndsWith("qlora.runtimeconfig.json")))
            Link(f, Path.Combine(app, Path.GetFileName(f)));
        Link(Path.Combine(Native, "libLibTorchSharp.so"), Path.Combine(app, "libLibTorchSharp.so"));
        return app;
    }

    private static (int Code, string Stdout, string Stderr) Qlora(string appFolder, IDictionary<string, string?> env, params string[] args)
    {
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host ? host : "dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        start.ArgumentList.Add(Path.Combine(appFolder, "qlora.dll"));
        foreach (var a in args) start.ArgumentList.Add(a);
        start.Environment.Remove("QLORA_LIBTORCH");
        start.Environment.Remove("QLORA_LIBTORCH_ALLOW_MISMATCH");
        foreach (var (k, v) in env) start.Environment[k] = v;
        using var p = Process.Start(start)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(3))) { p.Kill(true); throw new TimeoutException("qlora did not finish in 3 minutes"); }
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    [SkippableFact]
    public void ExternalLayoutLoadsTheNamedLibTorchAndComputes()
    {
        Skip.IfNot(OperatingSystem.IsLinux() && File.Exists(Path.Combine(Native, "libtorch_cpu.so")), "needs the linux-x64 CPU libtorch of the test build");
        var lib = FakePyTorch("2.10.0+cpu");
        var app = ExternalLayout();

        var (code, stdout, stderr) = Qlora(app, new Dictionary<string, string?> { ["QLORA_LIBTORCH"] = lib }, "doctor");
        Assert.True(code == 0, stdout + stderr);
        var json = JsonNode.Parse(stdout.TrimEnd().Split('\n')[^1])!;
        Assert.Equal("environment", (string?)json["libtorch"]!["source"]);
        Assert.Equal("2.10.0+cpu", (string?)json["libtorch"]!["version"]);
        // What the process really mapped: libtorch from the named folder, the shim from the app folder, nothing else.
        var mapped = json["libtorch"]!["mapped"]!.AsArray().Select(m => (string)m!).ToList();
        Assert.Contains(Path.Combine(lib, "libtorch_cpu.so"), mapped);
        Assert.Contains(Path.Combine(lib, "libc10.so"), mapped);
        Assert.Contains(Path.Combine(app, "libLibTorchSharp.so"), mapped);
        Assert.All(mapped.Where(m => !m.EndsWith("libLibTorchSharp.so")), m => Assert.StartsWith(lib, m));
        // It computes: the self-check's matmul against float64 and the custom-autograd gradient.
        Assert.All(json["self_check"]!.AsArray(), c => Assert.True((bool)c!["passed"]!, c.ToJsonString()));
        Assert.Equal(3, json["self_check"]!.AsArray().Count);
        // A CPU libtorch never sees CUDA; a machine without the NVIDIA driver is explained as a note, not an error.
        Assert.False((bool)json["cuda_available"]!);
        Assert.True((bool)json["healthy"]!);
        if (!System.Runtime.InteropServices.NativeLibrary.TryLoad("libcuda.so.1", out _))
        {
            Assert.Null(json["driver"]);
            Assert.Empty(json["devices"]!.AsArray());
            var finding = Assert.Single(json["findings"]!.AsArray());
            Assert.False((bool)finding!["error"]!);
            Assert.Contains("no usable NVIDIA GPU", (string?)finding["what"]);
            Assert.Contains("libcuda.so.1", (string?)finding["what"]);
            Assert.Contains("sm_80", (string?)json["ptx_fallback"]);
            Assert.Contains("runs on the CPU", stdout);
        }

        // Without a libtorch named, the external layout refuses torch verbs in one line.
        var none = Qlora(app, new Dictionary<string, string?>(), "generate", "--help-not-a-flag");
        Assert.Equal(1, none.Code);
        Assert.StartsWith("qlora: this qlora ships no libtorch", none.Stderr);
        Assert.Single(none.Stderr.TrimEnd().Split('\n'));
    }

    [SkippableFact]
    public void BuildThatShipsLibTorchRefusesAnotherOne()
    {
        Skip.IfNot(OperatingSystem.IsLinux() && File.Exists(Path.Combine(Native, "libtorch_cpu.so")), "needs the linux-x64 CPU libtorch of the test build");
        var lib = FakePyTorch("2.10.0+cpu");
        var env = new Dictionary<string, string?> { ["QLORA_LIBTORCH"] = lib };

        var train = Qlora(Bin, env, "train");
        Assert.Equal(1, train.Code);
        Assert.Contains("also ships its own libtorch", train.Stderr);
        Assert.Single(train.Stderr.TrimEnd().Split('\n'));

        var doctor = Qlora(Bin, env, "doctor");
        Assert.Equal(1, doctor.Code);
        var json = JsonNode.Parse(doctor.Stdout.TrimEnd().Split('\n')[^1])!;
        Assert.False((bool)json["healthy"]!);
        Assert.Contains("also ships its own libtorch", (string?)json["libtorch"]!["error"]);
        Assert.Empty(json["libtorch"]!["mapped"]!.AsArray()); // refused before anything loaded
    }

    [SkippableFact]
    public void OtherMinorVersionIsRefusedThenAllowedBehindTheSelfCheck()
    {
        Skip.IfNot(OperatingSystem.IsLinux() && File.Exists(Path.Combine(Native, "libtorch_cpu.so")), "needs the linux-x64 CPU libtorch of the test build");
        var lib = FakePyTorch("2.11.0+cpu"); // the files are 2.10's: the version file is what the preload reads
        var app = ExternalLayout();
        var env = new Dictionary<string, string?> { ["QLORA_LIBTORCH"] = lib };

        var refused = Qlora(app, env, "plan", "--model", "llama-3.1-8b");
        Assert.Equal(1, refused.Code);
        Assert.StartsWith($"qlora: the libtorch in {lib} is 2.11.0+cpu", refused.Stderr);
        Assert.Contains("QLORA_LIBTORCH_ALLOW_MISMATCH=1", refused.Stderr);

        env["QLORA_LIBTORCH_ALLOW_MISMATCH"] = "1";
        var allowed = Qlora(app, env, "plan", "--model", "llama-3.1-8b");
        Assert.True(allowed.Code == 0, allowed.Stdout + allowed.Stderr);
        var doctor = Qlora(app, env, "doctor");
        var json = JsonNode.Parse(doctor.Stdout.TrimEnd().Split('\n')[^1])!;
        Assert.True((bool)json["libtorch"]!["self_check_required"]!);
        Assert.Contains(json["findings"]!.AsArray(), f => ((string)f!["what"]!).Contains("differs from the shim's 2.10.0"));
    }
}
