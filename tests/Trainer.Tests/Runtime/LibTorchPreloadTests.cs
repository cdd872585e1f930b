using QLora.Trainer.Runtime;

namespace QLora.Trainer.Tests.Runtime;

/// <summary>
/// The preload's decisions, made without loading anything: fake libtorch folders (empty files with the right names)
/// laid out like a PyTorch installation (site-packages/torch/lib + torch/version.py) or a libtorch zip.
/// </summary>
public sealed class LibTorchPreloadTests : IDisposable
{
    // PyTorch's generated torch/version.py, as a 2.x wheel writes it.
    private const string VersionPy = """
        from typing import Optional

        __all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'xpu']
        __version__ = '{0}'
        debug = False
        cuda: Optional[str] = {1}
        git_version = '0123456789abcdef0123456789abcdef01234567'
        hip: Optional[str] = None
        xpu: Optional[str] = None
        """;

    private readonly string _root = Path.Combine(Path.GetTempPath(), "qlora-preload-" + Guid.NewGuid().ToString("N"));
    private readonly string _app;

    public LibTorchPreloadTests()
    {
        _app = Path.Combine(_root, "app");
        Directory.CreateDirectory(_app);
        File.WriteAllText(Path.Combine(_app, "qlora.dll"), "");
    }

    public void Dispose() => Directory.Delete(_root, recursive: true);

    private string FakeTorch(string name, string? version, string? cuda, bool cudaLibraries)
    {
        var torchDir = Path.Combine(_root, name, "site-packages", "torch");
        var lib = Path.Combine(torchDir, "lib");
        Directory.CreateDirectory(lib);
        foreach (var f in cudaLibraries ? LibTorchFiles.All : LibTorchFiles.Required) File.WriteAllText(Path.Combine(lib, f), "");
        if (version != null) File.WriteAllText(Path.Combine(torchDir, "version.py"), string.Format(VersionPy, version, cuda == null ? "None" : $"'{cuda}'"));
        return lib;
    }

    private static Func<string, string?> Env(params (string, string)[] vars) => n => vars.FirstOrDefault(v => v.Item1 == n).Item2;

    [Fact]
    public void ShimVersionIsTheCentralLibTorchVersion()
    {
        var props = File.ReadAllText(Path.Combine(RepoRoot(), "Directory.Packages.props"));
        Assert.Contains($"<LibTorchVersion>{LibTorchVersion.Shim.Text}</LibTorchVersion>", props);
        Assert.Equal((2, 10), (LibTorchVersion.Shim.Major, LibTorchVersion.Shim.Minor));
    }

    [Fact]
    public void MatchingPyTorchInstallationIsAcceptedFromTheEnvironment()
    {
        var lib = FakeTorch("py", "2.10.0+cu128", "12.8", cudaLibraries: true);
        var p = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", lib)), [_app]);
        Assert.True(p.Usable, p.Error);
        Assert.Equal(LibTorchSource.Environment, p.Source);
        Assert.Equal(lib, p.Directory);
        Assert.True(p.HasCudaLibraries);
        Assert.False(p.SelfCheckRequired);
        Assert.Equal("2.10.0+cu128", p.Version!.Text);
        Assert.Equal("12.8", p.Version.Cuda);
        Assert.True(p.Version.IsCudaBuild);
    }

    [Fact]
    public void CommandLineWinsAndThePackageFolderResolvesToItsLib()
    {
        var lib = FakeTorch("cli", "2.10.1+cpu", null, cudaLibraries: false);
        var other = FakeTorch("env", "2.10.0", null, cudaLibraries: false);
        var p = LibTorchPreload.Prepare(["train", "--libtorch", Path.GetDirectoryName(lib)!], Env(("QLORA_LIBTORCH", other)), [_app]);
        Assert.True(p.Usable, p.Error);
        Assert.Equal(LibTorchSource.CommandLine, p.Source);
        Assert.Equal(lib, p.Directory);
        Assert.False(p.HasCudaLibraries);
        Assert.Equal(LibTorchFiles.LoadOrder(cuda: false), ["libc10.so", "libtorch_cpu.so", "libtorch.so"]);
        Assert.Equal(LibTorchFiles.LoadOrder(cuda: true), ["libc10.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libtorch.so"]);

        var equals = LibTorchPreload.Prepare(["--libtorch=" + lib, "doctor"], Env(), [_app]);
        Assert.Equal(lib, equals.Directory);
    }

    [Fact]
    public void AppFolderWithItsOwnLibTorchIsRefused()
    {
        File.WriteAllText(Path.Combine(_app, "libtorch_cpu.so"), "");
        var lib = FakeTorch("py", "2.10.0", null, cudaLibraries: false);
        var p = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", lib)), [_app]);
        Assert.False(p.Usable);
        Assert.Contains("also ships its own libtorch", p.Error);
        Assert.Contains(Path.Combine(_app, "libtorch_cpu.so"), p.Error);
        Assert.DoesNotContain('\n', p.Error!);

        var bundled = LibTorchPreload.Prepare([], Env(), [_app]);
        Assert.True(bundled.Usable);
        Assert.Equal(LibTorchSource.Bundled, bundled.Source);
    }

    [Fact]
    public void OtherMinorVersionIsRefusedUnlessAllowedThenNeedsTheSelfCheck()
    {
        var lib = FakeTorch("py", "2.11.0+cu128", "12.8", cudaLibraries: true);
        var refused = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", lib)), [_app]);
        Assert.False(refused.Usable);
        Assert.Contains("2.11.0+cu128", refused.Error);
        Assert.Contains("built for libtorch 2.10", refused.Error);
        Assert.Contains("QLORA_LIBTORCH_ALLOW_MISMATCH=1", refused.Error);

        var allowed = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", lib), ("QLORA_LIBTORCH_ALLOW_MISMATCH", "1")), [_app]);
        Assert.True(allowed.Usable, allowed.Error);
        Assert.True(allowed.SelfCheckRequired);
    }

    [Fact]
    public void UnknownVersionIsRefusedUnlessAllowed()
    {
        var lib = FakeTorch("bare", version: null, cuda: null, cudaLibraries: false);
        var refused = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", lib)), [_app]);
        Assert.Contains("cannot tell the version", refused.Error);
        var allowed = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", lib), ("QLORA_LIBTORCH_ALLOW_MISMATCH", "1")), [_app]);
        Assert.True(allowed.SelfCheckRequired);
    }

    [Fact]
    public void LibTorchZipBuildVersionIsRead()
    {
        var lib = Path.Combine(_root, "libtorch", "lib");
        Directory.CreateDirectory(lib);
        foreach (var f in LibTorchFiles.Required) File.WriteAllText(Path.Combine(lib, f), "");
        File.WriteAllText(Path.Combine(_root, "libtorch", "build-version"), "2.10.0+cpu\n");
        var p = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", Path.Combine(_root, "libtorch"))), [_app]);
        Assert.True(p.Usable, p.Error);
        Assert.Equal((2, 10, 0), (p.Version!.Major, p.Version.Minor, p.Version.Patch));
        Assert.False(p.Version.IsCudaBuild);
    }

    [Fact]
    public void BadRequestsAreOneLineSayingWhatToDo()
    {
        var missing = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", Path.Combine(_root, "nowhere"))), [_app]);
        Assert.Contains("does not exist", missing.Error);
        var incomplete = Path.Combine(_root, "incomplete");
        Directory.CreateDirectory(incomplete);
        File.WriteAllText(Path.Combine(incomplete, "libc10.so"), "");
        var partial = LibTorchPreload.Prepare(["--libtorch", incomplete], Env(), [_app]);
        Assert.Contains("does not hold libtorch_cpu.so, libtorch.so", partial.Error);
        Assert.Contains("import torch", partial.Error);
        var noValue = LibTorchPreload.Prepare(["train", "--libtorch"], Env(), [_app]);
        Assert.Contains("--libtorch needs a folder", noValue.Error);
        var external = LibTorchPreload.Prepare([], Env(), [_app]);
        Assert.Equal(LibTorchSource.None, external.Source);
        Assert.Contains("ships no libtorch", external.Error);
        foreach (var p in new[] { missing, partial, noValue, external }) Assert.DoesNotContain('\n', p.Error!);
    }

    [Fact]
    public void NuGetPackageVersionIsRead()
    {
        var native = Path.Combine(_root, "libtorch-cpu-linux-x64", "2.10.0", "runtimes", "linux-x64", "native");
        Directory.CreateDirectory(native);
        foreach (var f in LibTorchFiles.Required) File.WriteAllText(Path.Combine(native, f), "");
        File.WriteAllText(Path.Combine(_root, "libtorch-cpu-linux-x64", "2.10.0", "libtorch-cpu-linux-x64.nuspec"),
            "<?xml version=\"1.0\"?><package><metadata><id>libtorch-cpu-linux-x64</id><version>2.10.0</version></metadata></package>");
        var p = LibTorchPreload.Prepare([], Env(("QLORA_LIBTORCH", native)), [_app]);
        Assert.True(p.Usable, p.Error);
        Assert.Equal("2.10.0", p.Version!.Text);
    }

    [Theory]
    [InlineData("2.10.0", 2, 10, 0)]
    [InlineData("2.11.0+cu128", 2, 11, 0)]
    [InlineData("2.12.0.dev20260101+cpu", 2, 12, 0)]
    [InlineData("3.0", 3, 0, 0)]
    public void VersionStringsParse(string text, int major, int minor, int patch)
    {
        var v = LibTorchVersion.Parse(text, null, "test")!;
        Assert.Equal((major, minor, patch), (v.Major, v.Minor, v.Patch));
        Assert.Null(LibTorchVersion.Parse("unknown", null, "test"));
    }

    private static string RepoRoot()
    {
        var dir = AppContext.BaseDirectory;
        while (!File.Exists(Path.Combine(dir, "QLora.sln"))) dir = Path.GetDirectoryName(dir)!;
        return dir;
    }
}
