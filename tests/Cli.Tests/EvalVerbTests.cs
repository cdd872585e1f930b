using System.Text.Json.Nodes;

namespace QLora.Cli.Tests;

public class EvalVerbTests
{
    [Fact]
    public void EvalScoresTheBundledModelWithTheQuickStartJobAndEndsWithTheJsonLine()
    {
        var repo = DataParallelFixture.RepoRoot();
        var dir = Path.Combine(Path.GetTempPath(), "qlora-eval-verb-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            // Three questions of the bundled multiple-choice set and two eval samples, in one file.
            var lines = File.ReadLines(Path.Combine(repo, "data", "quickstart", "choices.jsonl")).Take(3)
                .Concat(File.ReadLines(Path.Combine(repo, "data", "quickstart", "eval.jsonl")).Take(2));
            File.WriteAllLines(Path.Combine(dir, "mixed.jsonl"), lines);
            var r = CliRunner.Run("eval", "--config", Path.Combine(repo, "appsettings.json"), "--data", Path.Combine(dir, "mixed.jsonl"),
                "--Quantization:QuantType", "none", "--Model:ComputeDType", "float32", "--Eval:MaxNewTokens", "3");
            Assert.True(r.ExitCode == 0, r.Stderr);
            var j = JsonNode.Parse(r.LastLine)!;
            Assert.Equal("none", j["quant_type"]!.GetValue<string>());
            Assert.Equal(3, j["mc_items"]!.GetValue<int>());
            Assert.Equal(2, j["eval_samples"]!.GetValue<int>());
            Assert.Equal(2, j["exact_match_samples"]!.GetValue<int>());
            double loss = j["eval_loss"]!.GetValue<double>();
            Assert.True(loss > 0 && double.IsFinite(loss));
            Assert.Equal(Math.Round(Math.Exp(loss), 4), j["eval_perplexity"]!.GetValue<double>());
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void BadInputIsOneClearLine()
    {
        var repo = DataParallelFixture.RepoRoot();
        var missing = CliRunner.Run("eval", "--config", Path.Combine(repo, "appsettings.json"), "--data", "no/such.jsonl");
        Assert.NotEqual(0, missing.ExitCode);
        Assert.Contains("no/such.jsonl", missing.Stderr);
        Assert.Single(missing.Stderr.Trim().Split('\n'));
        var quant = CliRunner.Run("eval", "--config", Path.Combine(repo, "appsettings.json"), "--Quantization:QuantType", "int3");
        Assert.NotEqual(0, quant.ExitCode);
        Assert.Contains("Quantization:QuantType = 'int3': allowed values are nf4, fp4, none", quant.Stderr);
    }
}
