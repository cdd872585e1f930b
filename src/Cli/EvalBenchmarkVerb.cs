using System.CommandLine;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary><c>qlora bench eval</c>: exact match decoded one sample at a time vs in batches with a shared KV cache.</summary>
internal static class EvalBenchmarkVerb
{
    public static Command Create(TextWriter stdout)
    {
        var model = new Option<string>("--model") { Description = "the base model folder", DefaultValueFactory = _ => "models/tiny-llama-base" };
        var adapter = new Option<string?>("--adapter") { Description = "a PEFT adapter folder to apply (e.g. out/quickstart)" };
        var eval = new Option<string>("--eval") { Description = "the eval JSONL file", DefaultValueFactory = _ => "data/quickstart/eval.jsonl" };
        var template = new Option<string?>("--template") { Description = "chat template name (the quick start uses mistral)", DefaultValueFactory = _ => "mistral" };
        var samples = new Option<int>("--samples") { Description = "samples scored (0: all)", DefaultValueFactory = _ => 100 };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "generation limit per answer", DefaultValueFactory = _ => 16 };
        var batch = new Option<int>("--batch-size") { Description = "the batched variant's batch size (>= 2)", DefaultValueFactory = _ => 16 };
        var repeats = new Option<int>("--repeats") { Description = "timed runs of each variant, alternating (medians reported)", DefaultValueFactory = _ => 3 };
        var dtype = new Option<string>("--compute-dtype") { Description = "bfloat16 (as the quick start trains) or float32", DefaultValueFactory = _ => "bfloat16" };
        var cmd = new Command("eval", "Greedy exact match one sample at a time vs left-padded batches with a KV cache (Eval:BatchSize), alternated in one run.")
        {
            model, adapter, eval, template, samples, maxNew, batch, repeats, dtype,
        };
        cmd.SetAction(r =>
        {
            var o = new EvalBenchmark.Options
            {
                Model = r.GetValue(model)!, Adapter = r.GetValue(adapter), EvalFile = r.GetValue(eval)!, Template = r.GetValue(template),
                Samples = r.GetValue(samples), MaxNewTokens = r.GetValue(maxNew), BatchSize = r.GetValue(batch), Repeats = r.GetValue(repeats),
                ComputeDType = r.GetValue(dtype) switch
                {
                    "bfloat16" => TorchSharp.torch.ScalarType.BFloat16,
                    "float32" => TorchSharp.torch.ScalarType.Float32,
                    var d => throw new ArgumentException($"--compute-dtype {d}: use bfloat16 or float32"),
                },
            };
            if (!File.Exists(o.EvalFile)) throw new FileNotFoundException($"--eval {o.EvalFile}: no such file");
            var result = EvalBenchmark.Run(o, stdout.WriteLine);
            stdout.WriteLine($"machine: {DequantBenchmark.CpuName()}; {result.Samples} samples; medians of {o.Repeats} alternating runs");
            stdout.WriteLine($"one at a time: {result.SequentialSeconds:F2} s (exact match {result.SequentialExactMatch:P1}); batches of {result.BatchSize}: {result.BatchedSeconds:F2} s (exact match {result.BatchedExactMatch:P1}); speedup {result.Speedup:F2}x; {result.IdenticalAnswers}/{result.Samples} answers identical token for token");
            stdout.WriteLine(result.ToJson());
            return 0;
        });
        return cmd;
    }
}
