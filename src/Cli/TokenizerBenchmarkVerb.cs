using System.CommandLine;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary><c>qlora bench tokenizer</c>: managed vs native tokenizer, tokens per second and identical ids on the same texts.</summary>
internal static class TokenizerBenchmarkVerb
{
    public static Command Create(TextWriter stdout)
    {
        var tokenizer = new Option<string>("--tokenizer") { Description = "a model folder or a tokenizer.json", DefaultValueFactory = _ => "models/tiny-llama-base" };
        var text = new Option<string[]>("--text")
        {
            Description = "text files or folders (JSONL: each string value; others: ~2,000-character pieces); repeatable",
            DefaultValueFactory = _ => ["data/quickstart/train.jsonl"],
            AllowMultipleArgumentsPerToken = true,
        };
        var repeats = new Option<int>("--repeats") { Description = "timed passes of each implementation, alternating (medians reported)", DefaultValueFactory = _ => 5 };
        var cmd = new Command("tokenizer", "The managed tokenizer vs Hugging Face's native one (linux-x64): tokens/s of encode, alternated in one run, and identical ids.")
        {
            tokenizer, text, repeats,
        };
        cmd.SetAction(r =>
        {
            var o = new TokenizerBenchmark.Options { Tokenizer = r.GetValue(tokenizer)!, Texts = r.GetValue(text)!, Repeats = r.GetValue(repeats) };
            var result = TokenizerBenchmark.Run(o, stdout.WriteLine);
            stdout.WriteLine($"machine: {DequantBenchmark.CpuName()}; {result.Texts} texts, {result.Tokens:N0} tokens; medians of {o.Repeats} alternating passes (word caches warm)");
            var line = $"managed: {result.Managed.TokensPerSecond:N0} tokens/s ({result.Managed.Seconds:F3} s; cold {result.Managed.ColdSeconds:F3} s)";
            if (result.Native is { } n)
                line += $"; native: {n.TokensPerSecond:N0} tokens/s ({n.Seconds:F3} s; cold {n.ColdSeconds:F3} s); managed/native {result.Ratio:F2}x; identical ids on {result.IdenticalTexts}/{result.Texts} texts";
            stdout.WriteLine(line);
            stdout.WriteLine(result.ToJson());
            return 0;
        });
        return cmd;
    }
}
