using System.CommandLine;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// <c>qlora bench quality</c>: the job (the quick start by default) trained on a 16-bit, NF4+DQ, NF4, FP4+DQ and FP4
/// base with the same seed, data order and steps, each evaluated with <c>qlora eval</c>'s code before and after training.
/// </summary>
internal static class QualityBenchmarkVerb
{
    public static Command Create(TextWriter stdout)
    {
        var config = new Option<string?>("--config") { Description = "the job file (default: ./appsettings.json, the quick start)" };
        var output = new Option<string>("--out") { Description = "a folder for the variants' runs (one subfolder each)", DefaultValueFactory = _ => "out/bench-quality" };
        var only = new Option<string?>("--variants") { Description = $"comma-separated subset of {string.Join(", ", QualityBenchmark.Variants.Select(v => v.Name))} (default: all)" };
        var choices = new Option<string?>("--choices") { Description = "multiple-choice JSONL (default: the job's Eval:ChoicesFile)" };
        var cmd = new Command("quality", "What 4 bits cost: the job trained on a bf16, NF4+DQ, NF4, FP4+DQ and FP4 base (same seed, data, steps); eval loss, perplexity, exact match and multiple-choice accuracy before and after. Overrides as --Section:Key value.")
        {
            config, output, only, choices,
        };
        cmd.TreatUnmatchedTokensAsErrors = false;
        cmd.SetAction(r =>
        {
            var jobPath = r.GetValue(config) ?? Path.Combine(Directory.GetCurrentDirectory(), "appsettings.json");
            var job = JobConfiguration.LoadTrainJob(jobPath, r.UnmatchedTokens);
            IReadOnlyList<QualityBenchmark.Variant>? variants = null;
            if (r.GetValue(only) is { } list)
            {
                variants = [.. list.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(n =>
                    QualityBenchmark.Variants.FirstOrDefault(v => v.Name.Equals(n, StringComparison.OrdinalIgnoreCase))
                    ?? throw new ArgumentException($"--variants: unknown variant '{n}'; use {string.Join(", ", QualityBenchmark.Variants.Select(v => v.Name))}"))];
            }
            string? mc = r.GetValue(choices) is { } c ? Path.GetFullPath(c) : job.Eval.ChoicesFile;
            var rows = QualityBenchmark.Run(new QualityBenchmark.Options
            {
                Job = job, ChoicesFile = mc, OutputRoot = Path.GetFullPath(r.GetValue(output)!), Only = variants, Log = stdout.WriteLine,
            });
            int steps = rows.Count > 0 ? rows[0].Training.Steps : 0;
            stdout.WriteLine($"machine: {DequantBenchmark.CpuName()}; {steps} steps per variant, seed {job.Training.Seed}, compute dtype {job.Model.ComputeDType} (the 'bf16' base is this dtype)");
            foreach (var line in QualityBenchmark.Table(rows)) stdout.WriteLine(line);
            if (QualityBenchmark.Targets(rows) is { } t)
                stdout.WriteLine($"NF4+DQ vs bf16 after training: eval loss {t.LossRatio * 100:+0.00;-0.00} % (target within 2 %), exact match {t.ExactMatchPoints:+0.0;-0.0} points (target within 2): {(t.Met ? "met" : "not met")}");
            stdout.WriteLine(QualityBenchmark.ToJson(rows, steps));
            return 0;
        });
        return cmd;
    }
}
