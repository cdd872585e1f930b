using System.Text.Json.Nodes;

namespace QLora.Cli.Tests;

public class BenchTokenizerVerbTests
{
    [Fact]
    public void ManagedAndNativeAgreeOnTheQuickStartDataAndTheRunEndsWithTheJsonLine()
    {
        var repo = DataParallelFixture.RepoRoot();
        var r = CliRunner.Run("bench", "tokenizer", "--tokenizer", Path.Combine(repo, "models", "tiny-llama-base"),
            "--text", Path.Combine(repo, "data", "quickstart", "eval.jsonl"), "--repeats", "1");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var j = JsonNode.Parse(r.LastLine)!;
        Assert.Equal("tokenizer", j["bench"]!.GetValue<string>());
        int texts = j["texts"]!.GetValue<int>();
        Assert.Equal(300, texts); // eval.jsonl: 100 samples of instruction, input and output
        // The bundled tokenizer is byte-level with no merges: one token per UTF-8 byte.
        Assert.Equal(j["characters"]!.GetValue<long>(), j["tokens"]!.GetValue<long>());
        Assert.True(j["managed_tokens_per_s"]!.GetValue<double>() > 0);
        if (j["native_tokens_per_s"] is JsonValue)
            Assert.Equal(texts, j["identical_texts"]!.GetValue<int>());
    }

    [Fact]
    public void AMissingTextFileIsOneClearLine()
    {
        var r = CliRunner.Run("bench", "tokenizer", "--text", "no/such.jsonl");
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("--text no/such.jsonl: no such file or folder", r.Stderr);
    }
}
