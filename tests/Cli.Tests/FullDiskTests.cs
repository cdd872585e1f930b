using System.Diagnostics;
using System.Security.Cryptography;
using QLora.Trainer;
using TorchSharp;

namespace QLora.Cli.Tests;

/// <summary>
/// Running out of disk while writing (docs/reliability.md, "a full disk"): a checkpoint, the final adapter, a quantized
/// model and a merged model each fail with exit code 1 and one line saying the disk is full and what to do; what was
/// complete before is byte for byte unchanged; no staging folder or temporary file is left to keep the disk full; and
/// once space is freed the same command (or <c>--resume latest</c>) finishes. A full disk is a tmpfs of a few MiB
/// (root on Linux; skipped where it cannot be mounted); the file size limit (<c>ulimit -f</c>, EFBIG) needs no root.
/// </summary>
public class FullDiskTests
{
    static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "QLora.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("QLora.sln not found above the test binaries");
    }

    static string Job => Path.Combine(RepoRoot(), "appsettings.json");
    static string Model => Path.Combine(RepoRoot(), "models", "tiny-llama-base");
    static string Dotnet => Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet";

    /// <summary>A small tmpfs: a disk that fills up; <see cref="Resize"/> frees space (or takes it).</summary>
    sealed class SmallDisk : IDisposable
    {
        SmallDisk(string path) => Path = path;

        public string Path { get; }

        /// <summary>A tmpfs of <paramref name="kib"/> KiB, or null (with the reason) where none can be mounted.</summary>
        public static SmallDisk? TryCreate(int kib, out string why)
        {
            why = "";
            if (!OperatingSystem.IsLinux() || !Environment.IsPrivilegedProcess)
            {
                why = "mounting a small tmpfs needs root on Linux";
                return null;
            }
            var path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "qlora-fulldisk-" + Guid.NewGuid().ToString("N"));
            Directory.CreateDirectory(path);
            var (code, output) = Exec("mount", "-t", "tmpfs", "-o", $"size={kib}k", "tmpfs", path);
            if (code == 0) return new SmallDisk(path);
            Directory.Delete(path);
            why = $"mount -t tmpfs failed here ({output.Trim()})";
            return null;
        }

        public void Resize(int kib) => Assert.Equal(0, Exec("mount", "-o", $"remount,size={kib}k", Path).Code);

        public void Dispose()
        {
            Exec("umount", Path);
            try { Directory.Delete(Path, recursive: true); } catch (IOException) { }
        }
    }

    static (int Code, string Output) Exec(string file, params string[] args)
    {
        var info = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) info.ArgumentList.Add(a);
        using var p = Process.Start(info)!;
        var err = p.StandardError.ReadToEndAsync();
        string output = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, output + err.Result);
    }

    /// <summary>Runs qlora as a child process to its end.</summary>
    static (int Code, string Stdout, string Stderr) Qlora(params string[] args)
    {
        using var p = new CliProcess(args);
        int code = p.WaitForExit(TimeSpan.FromMinutes(10)); // a loaded 2-core machine
        return (code, p.Stdout, p.Stderr);
    }

    static void AssertDiskFullLine((int Code, string Stdout, string Stderr) r, string expected)
    {
        Assert.True(r.Code == 1, $"exit {r.Code}: {r.Stderr}{r.Stdout}");
        Assert.Single(r.Stderr.TrimEnd().Split('\n'));
        Assert.Contains(expected, r.Stderr);
        Assert.Contains("nothing complete was replaced and the unfinished files were removed", r.Stderr);
        Assert.DoesNotContain("   at ", r.Stderr + r.Stdout);
    }

    /// <summary>Staging folders and temporary files (the names the project writes under) anywhere below <paramref name="dir"/>.</summary>
    static List<string> Leftovers(string dir) => Directory.EnumerateFileSystemEntries(dir, "*", SearchOption.AllDirectories)
        .Where(f => Path.GetFileName(f).Contains(".partial-", StringComparison.Ordinal) || f.EndsWith(".qlora-tmp", StringComparison.Ordinal)
                    || f.EndsWith(".old", StringComparison.Ordinal))
        .ToList();

    static SortedDictionary<string, string> Snapshot(string dir) => new(Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories)
        .ToDictionary(f => Path.GetRelativePath(dir, f), f => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(f)))), StringComparer.Ordinal);

    /// <summary>
    /// A checkpoint that does not fit (LoRA r = 32: 2.4 MB adapter + 4.7 MB optimizer state on a 3 MiB disk), then, with
    /// 8.5 MiB, a checkpoint that fits and a final adapter that does not; with space freed, <c>--resume latest</c> of the
    /// finished run writes the missing adapter from the checkpoint.
    /// </summary>
    [SkippableFact]
    public void TrainingOnAFullDiskKeepsEveryCompleteCheckpointAndResumes()
    {
        using var disk = SmallDisk.TryCreate(3 << 10, out var why);
        Skip.If(disk is null, why);
        using var tmp = new TempDir();
        File.WriteAllLines(tmp["train.jsonl"], File.ReadLines(Path.Combine(RepoRoot(), "data", "quickstart", "train.jsonl")).Take(40)); // 2 held out for eval: a short final eval
        var output = Path.Combine(disk!.Path, "run");
        string[] train = ["train", "--config", Job, "--Data:TrainFile", tmp["train.jsonl"], "--Data:EvalFile", "", "--Lora:Rank", "32", "--Training:MaxSteps", "1",
            "--Eval:EveryNSteps", "0", "--Eval:ExactMatch", "false", "--Output:Dir", output];

        var full = Qlora(train);
        AssertDiskFullLine(full, "the disk is full (writing in " + Path.Combine(output, "checkpoints", "checkpoint-000001") + ")");
        Assert.Contains("--resume latest continues from the newest complete checkpoint", full.Stderr);
        Assert.Empty(Leftovers(disk.Path));
        Assert.Empty(Directory.EnumerateFileSystemEntries(Path.Combine(output, "checkpoints")));

        disk.Resize(8704);
        var adapterFull = Qlora(train);
        AssertDiskFullLine(adapterFull, "the disk is full (writing in " + output + ")");
        Assert.Empty(Leftovers(disk.Path));
        var checkpoint = Path.Combine(output, "checkpoints", "checkpoint-000001");
        Assert.Null(TrainingCheckpoints.Verify(checkpoint)); // complete, its manifest's sizes and digests hold
        Assert.False(File.Exists(Path.Combine(output, PeftAdapter.WeightsFile)));

        disk.Resize(32 << 10);
        var resumed = Qlora([.. train, "--resume", "latest"]);
        Assert.True(resumed.Code == 0, resumed.Stderr + resumed.Stdout);
        Assert.Contains("the run already finished at step 1", resumed.Stdout);
        Assert.Contains("wrote the run's adapter", resumed.Stdout);
        Assert.Equal(File.ReadAllBytes(Path.Combine(checkpoint, PeftAdapter.WeightsFile)), File.ReadAllBytes(Path.Combine(output, PeftAdapter.WeightsFile)));
        Assert.Empty(Leftovers(disk.Path));
    }

    /// <summary>
    /// quantize --overwrite and merge onto a disk without room for their output: the previous output is byte for byte
    /// unchanged, nothing is left behind, and with space freed the same commands succeed.
    /// </summary>
    [SkippableFact]
    public void QuantizeAndMergeOnAFullDiskLeaveThePreviousOutputAndNoLeftovers()
    {
        using var disk = SmallDisk.TryCreate(3 << 10, out var why);
        Skip.If(disk is null, why);
        using var tmp = new TempDir();
        var quantized = Path.Combine(disk!.Path, "q");
        string[] quantize = ["quantize", "--input", Model, "--output", quantized, "--overwrite"];
        Assert.Equal(0, Qlora(quantize).Code); // 1.8 MB: fits once, not twice
        var before = Snapshot(quantized);
        AssertDiskFullLine(Qlora(quantize), "the disk is full (writing in " + quantized + ")");
        Assert.Equal(before, Snapshot(quantized));
        Assert.Empty(Leftovers(disk.Path));

        // An adapter to merge: rank 8 on every projection of the bundled model, B non-zero so the merge changes weights.
        var adapter = tmp["adapter"];
        using (var model = HfModelLoader.Load(Model))
        {
            var lora = new LoraOptions { Rank = 8, Alpha = 16, TargetModules = LoraOptions.AllLinear };
            model.ApplyLora(lora, new torch.Generator(1));
            using (torch.no_grad())
                foreach (var (_, layer) in model.LoraLayers) layer.LoraB(lora.AdapterName).normal_(0, 0.01);
            PeftAdapter.Save(model, lora, adapter, baseModel: Model);
        }
        var merged = Path.Combine(disk.Path, "m");
        string[] merge = ["merge", "--base", Model, "--adapter", adapter, "--output", merged];
        AssertDiskFullLine(Qlora(merge), "the disk is full (writing in " + merged + ")");
        Assert.False(Directory.Exists(merged));
        Assert.Empty(Leftovers(disk.Path));
        Assert.Equal(before, Snapshot(quantized));

        disk.Resize(16 << 10);
        var ok = Qlora(merge);
        Assert.True(ok.Code == 0, ok.Stderr);
        Assert.True(File.Exists(Path.Combine(merged, "model.safetensors")));
        Assert.Equal(0, Qlora(quantize).Code);
        Assert.Empty(Leftovers(disk.Path));
    }

    /// <summary>
    /// The file size limit (RLIMIT_FSIZE through <c>ulimit -f</c>, SIGXFSZ ignored so the write fails with EFBIG): no root
    /// needed. quantize's 1.8 MB model file is over a 512 KiB limit: one line naming the limit, nothing left behind.
    /// </summary>
    [SkippableFact]
    public void AFileSizeLimitIsReportedInOneLineAndLeavesNothing()
    {
        Skip.IfNot(OperatingSystem.IsLinux() && File.Exists("/bin/bash"), "ulimit -f through bash on Linux");
        using var tmp = new TempDir();
        var output = tmp["q"];
        var info = new ProcessStartInfo("/bin/bash") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { "-c", "trap '' XFSZ; ulimit -f 512; exec \"$0\" \"$@\"", Dotnet, Path.Combine(AppContext.BaseDirectory, "qlora.dll"),
                     "quantize", "--input", Model, "--output", output })
            info.ArgumentList.Add(a);
        info.Environment["DOTNET_EnableWriteXorExecute"] = "0"; // the runtime's double-mapped code memory is a file the limit also caps
        using var p = Process.Start(info)!;
        var err = p.StandardError.ReadToEndAsync();
        string stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        var r = (p.ExitCode, stdout, err.Result);
        AssertDiskFullLine(r, "qlora quantize: a file reached the file size limit (ulimit -f); nothing complete was replaced");
        Assert.False(Directory.Exists(output));
        Assert.Empty(Leftovers(tmp.Path));
    }
}
