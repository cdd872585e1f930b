using System.Text.Json.Nodes;

namespace QLora.Cli.Tests;

public class TrainVerbTests
{
    static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "QLora.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("QLora.sln not found above the test binaries");
    }

    [Fact]
    public void TheQuickStartJobRunsEndToEndOnAFewStepsAndEndsWithItsSummaryLine()
    {
        using var tmp = new TempDir();
        var job = Path.Combine(RepoRoot(), "appsettings.json");
        var r = CliRunner.Run("train", "--config", job, "--Training:MaxSteps", "4", "--Output:Dir", tmp["out"],
            "--Eval:ExactMatchSamples", "3", "--Output:SaveEveryNSteps", "2");
        Assert.True(r.ExitCode == 0, r.Stderr + r.Stdout);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.Equal(4, json["steps"]!.GetValue<int>());
        foreach (var key in new[] { "train_loss", "eval_loss", "tokens_per_s", "wall_s", "exact_match_before", "exact_match_after" })
            Assert.True(json[key]!.GetValue<double>() >= 0, key);
        Assert.True(json["peak_memory_bytes"]!.GetValue<long>() > 0);
        Assert.Equal(tmp["out"], json["output_dir"]!.GetValue<string>());
        foreach (var f in new[] { "adapter_config.json", "adapter_model.safetensors", "job.json", "run_summary.json", "loss.png", "train_log.jsonl" })
            Assert.True(File.Exists(Path.Combine(tmp["out"], f)), f);
        Assert.Equal([0x89, (byte)'P', (byte)'N', (byte)'G'], File.ReadAllBytes(Path.Combine(tmp["out"], "loss.png"))[..4]);
        Assert.Equal(4, JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["out"], "run_summary.json")))!["steps"]!.GetValue<int>());
        Assert.True(Directory.Exists(Path.Combine(tmp["out"], "checkpoints", "checkpoint-000004")));

        // The same folder again without --resume or Overwrite: refused in one line, nothing replaced.
        var again = CliRunner.Run("train", "--config", job, "--Training:MaxSteps", "4", "--Output:Dir", tmp["out"], "--Output:Overwrite", "false");
        Assert.Equal(1, again.ExitCode);
        Assert.Contains("--resume latest", again.Stderr);
        Assert.Single(again.Stderr.TrimEnd().Split('\n'));
        Assert.True(File.Exists(Path.Combine(tmp["out"], "adapter_model.safetensors")));

        // Resuming the finished run from its last checkpoint with more steps continues it.
        var resumed = CliRunner.Run("train", "--config", job, "--Training:MaxSteps", "5", "--Output:Dir", tmp["out"], "--resume", "latest",
            "--Eval:ExactMatch", "false");
        Assert.True(resumed.ExitCode == 0, resumed.Stderr);
        Assert.Equal(5, JsonNode.Parse(resumed.LastLine)!["steps"]!.GetValue<int>());
        Assert.Equal(4, JsonNode.Parse(resumed.LastLine)!["resumed_from_step"]!.GetValue<int>());
    }

    [Fact]
    public void ABadKeyOrValueStopsBeforeLoadingWithOneLineNamingIt()
    {
        var job = Path.Combine(RepoRoot(), "appsettings.json");
        var r = CliRunner.Run("train", "--config", job, "--Training:LearningRat", "1e-4");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("unknown key Training:LearningRat", r.Stderr);
        Assert.Single(r.Stderr.TrimEnd().Split('\n'));
        var bad = CliRunner.Run("train", "--config", job, "--Lora:Rank", "zero");
        Assert.Equal(1, bad.ExitCode);
        Assert.Contains("Lora:Rank = 'zero': an integer required", bad.Stderr);
        var missing = CliRunner.Run("train", "--config", Path.Combine(RepoRoot(), "no-such-job.json"));
        Assert.Equal(1, missing.ExitCode);
        Assert.Contains("no-such-job.json", missing.Stderr);
    }
}
