using System.Text.Json.Nodes;

namespace QLora.Cli.Tests;

public class BenchMemoryVerbTests
{
    private static readonly string[] Tiny = ["--layers", "3", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "96", "--seq", "16"];

    [Fact]
    public void InMemoryAndStreamedStepsEndWithTheirJsonLine()
    {
        using var tmp = new TempDir();
        var plain = CliRunner.Run(["bench", "memory", "--preset", "llama-2-7b", .. Tiny]);
        Assert.True(plain.ExitCode == 0, plain.Stderr);
        var a = JsonNode.Parse(plain.LastLine)!;
        Assert.Equal("memory", a["bench"]!.GetValue<string>());
        Assert.Equal("llama-2-7b", a["preset"]!.GetValue<string>());
        Assert.False(a["stream"]!.GetValue<bool>());
        Assert.True(a["measured_peak_bytes"]!.GetValue<long>() > 0);
        Assert.True(a["planned_peak_bytes"]!.GetValue<long>() > 0);
        Assert.True(a["step_s"]!.GetValue<double>() > 0);
        Assert.True(a["hardware"]!["cores"]!.GetValue<int>() > 0);
        Assert.Contains("measured peak resident anonymous memory", plain.Stdout);

        string[] streamed = ["bench", "memory", "--preset", "llama-3.1-70b", "--stream", "--scratch", tmp["scratch"], .. Tiny];
        var first = CliRunner.Run(streamed);
        Assert.True(first.ExitCode == 0, first.Stderr);
        var b = JsonNode.Parse(first.LastLine)!;
        Assert.True(b["stream"]!.GetValue<bool>());
        Assert.Equal(2, b["stream_max_resident_layers"]!.GetValue<int>());
        Assert.Equal(2 * 3 - 2, b["stream_loads"]!.GetValue<int>());
        Assert.Contains("writing a random bnb-4bit checkpoint", first.Stdout);
        // The checkpoint is kept and reused by the next run of the same shape, which computes the same loss.
        var second = CliRunner.Run(streamed);
        Assert.True(second.ExitCode == 0, second.Stderr);
        Assert.Contains("reusing the random bnb-4bit checkpoint", second.Stdout);
        Assert.Equal(b["loss"]!.GetValue<double>(), JsonNode.Parse(second.LastLine)!["loss"]!.GetValue<double>());
    }

    [Fact]
    public void StreamedAndInMemoryWeightsGiveTheSameLoss()
    {
        using var tmp = new TempDir();
        var plain = CliRunner.Run(["bench", "memory", "--preset", "qwen2.5-32b", .. Tiny]);
        var streamed = CliRunner.Run(["bench", "memory", "--preset", "qwen2.5-32b", "--stream", "--scratch", tmp["s"], .. Tiny]);
        Assert.True(plain.ExitCode == 0 && streamed.ExitCode == 0, plain.Stderr + streamed.Stderr);
        Assert.Equal(JsonNode.Parse(plain.LastLine)!["loss"]!.GetValue<double>(), JsonNode.Parse(streamed.LastLine)!["loss"]!.GetValue<double>());
    }

    [Fact]
    public void AWholeJobOnAWrittenDenseFolderReportsItsPeakPhaseBesideThePlan()
    {
        using var tmp = new TempDir();
        // the vocabulary must hold the byte-level tokenizer's 258 tokens
        var run = CliRunner.Run(["bench", "memory", "--preset", "llama-2-7b", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
            "--kv-heads", "2", "--vocab", "300", "--seq", "32", "--from-folder", tmp["model"],
            "--write-folder", "dense", "--shard-bytes", "20000", "--scratch", tmp["s"]]);
        Assert.True(run.ExitCode == 0, run.Stderr);
        var j = JsonNode.Parse(run.LastLine)!;
        Assert.Equal("job", j["mode"]!.GetValue<string>());
        Assert.True(j["measured_peak_bytes"]!.GetValue<long>() > 0 && j["planned_peak_bytes"]!.GetValue<long>() > 0);
        Assert.False(string.IsNullOrEmpty(j["peak_phase"]!.GetValue<string>()));
        Assert.True(Directory.GetFiles(tmp["model"], "model-*.safetensors").Length > 1, "a dense folder in several shards");
        Assert.True(File.Exists(Path.Combine(tmp["model"], "tokenizer.json")));
        Assert.Contains("measured peak resident anonymous memory of the whole job", run.Stdout);
    }

    [Fact]
    public void AFolderItDidNotWriteIsNeverEmptied()
    {
        using var tmp = new TempDir();
        // someone's real model folder: safetensors and a config, no generator marker
        Directory.CreateDirectory(tmp["model"]);
        var weights = Path.Combine(tmp["model"], "model.safetensors");
        File.WriteAllBytes(weights, [1, 2, 3, 4, 5, 6, 7, 8]);
        File.WriteAllText(Path.Combine(tmp["model"], "config.json"), "{}");
        var run = CliRunner.Run(["bench", "memory", "--preset", "llama-2-7b", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
            "--kv-heads", "2", "--vocab", "300", "--seq", "32", "--from-folder", tmp["model"], "--write-folder", "dense", "--scratch", tmp["s"]]);
        Assert.Equal(1, run.ExitCode);
        Assert.Contains("did not write", run.Stderr);
        Assert.Equal(new byte[] { 1, 2, 3, 4, 5, 6, 7, 8 }, File.ReadAllBytes(weights));
        Assert.Equal("{}", File.ReadAllText(Path.Combine(tmp["model"], "config.json")));
    }

    [Fact]
    public void BadInputIsAOneLineError()
    {
        var unknown = CliRunner.Run("bench", "memory", "--preset", "gpt-5");
        Assert.Equal(1, unknown.ExitCode);
        Assert.Contains("valid presets: llama-2-7b, llama-3.1-8b, llama-2-13b, qwen2.5-32b, llama-3.1-70b", unknown.Stderr);
        Assert.Single(unknown.Stderr.TrimEnd().Split('\n'));
        var seq = CliRunner.Run(["bench", "memory", "--preset", "llama-2-7b", .. Tiny[..^2], "--seq", "1"]);
        Assert.Equal(1, seq.ExitCode);
        Assert.Contains("--seq 1", seq.Stderr);
        var heads = CliRunner.Run("bench", "memory", "--preset", "llama-2-7b", "--heads", "5");
        Assert.Equal(1, heads.ExitCode);
        Assert.Contains("multiple of heads", heads.Stderr);
        var missing = CliRunner.Run("bench", "memory");
        Assert.Equal(2, missing.ExitCode);
    }
}
