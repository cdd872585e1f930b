using System.Text.Json.Nodes;

namespace QLora.Cli.Tests;

public class BenchEvalVerbTests
{
    [Fact]
    public void BatchedAndOneAtATimeGiveTheSameAnswersAndEndWithTheJsonLine()
    {
        var repo = DataParallelFixture.RepoRoot();
        var r = CliRunner.Run("bench", "eval", "--model", Path.Combine(repo, "models", "tiny-llama-base"),
            "--eval", Path.Combine(repo, "data", "quickstart", "eval.jsonl"), "--samples", "5", "--max-new-tokens", "3",
            "--batch-size", "2", "--repeats", "1", "--compute-dtype", "float32");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var j = JsonNode.Parse(r.LastLine)!;
        Assert.Equal("eval", j["bench"]!.GetValue<string>());
        Assert.Equal(5, j["samples"]!.GetValue<int>());
        Assert.Equal(5, j["identical_answers"]!.GetValue<int>());
        Assert.Equal(j["exact_match_sequential"]!.GetValue<double>(), j["exact_match_batched"]!.GetValue<double>());
        Assert.True(j["batched_s"]!.GetValue<double>() > 0);
    }

    [Fact]
    public void BadOptionsAreOneClearLine()
    {
        var r = CliRunner.Run("bench", "eval", "--compute-dtype", "fp8");
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("--compute-dtype fp8: use bfloat16 or float32", r.Stderr);
        var missing = CliRunner.Run("bench", "eval", "--eval", "no/such.jsonl");
        Assert.NotEqual(0, missing.ExitCode);
        Assert.Contains("--eval no/such.jsonl: no such file", missing.Stderr);
    }
}
