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
        var seeds = new Option<string?>("--seeds") { Description = "comma-separated training seeds: each variant trained once per seed, medians reported (default: the job's Training:Seed)" };
        var cmd = new Command("quality", "What 4 bits cost: the job trained on a bf16, NF4+DQ, NF4, FP4+DQ and FP4 base (same seed, data, steps); eval loss, perplexity, exact match and multiple-choice accuracy before and after. Overrides as --Section:Key value.")
        {
            config, output, only, choices, seeds,
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
            IReadOnlyList<int>? seedList = null;
            if (r.GetValue(seeds) is { } sl)
            {
                seedList = [.. sl.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(x =>
                    int.TryParse(x, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out int n) && n >= 0 ? n
                    : throw new ArgumentException($"--seeds: '{x}' is not a seed; give non-negative integers separated by commas, e.g. --seeds 42,43,44"))];
                if (seedList.Count == 0 || seedList.Distinct().Count() != seedList.Count)
                    throw new ArgumentException("--seeds: give one or more different seeds separated by commas, e.g. --seeds 42,43,44");
            }
            string? mc = r.GetValue(choices) is { } c ? Path.GetFullPath(c) : job.Eval.ChoicesFile;
            var rows = QualityBenchmark.Run(new QualityBenchmark.Options
            {
                Job = job, ChoicesFile = mc, OutputRoot = Path.GetFullPath(r.GetValue(output)!), Only = variants, Seeds = seedList, Log = stdout.WriteLine,
            });
            int steps = rows.Count > 0 ? rows[0].Training.Steps : 0;
            stdout.WriteLine($"machine: {DequantBenchmark.CpuName()}; {steps} steps per variant, seed{(seedList is { Count: > 1 } ? "s " + string.Join(", ", seedList) : " " + (seedList?[0] ?? job.Training.Seed))}, compute dtype {job.Model.ComputeDType} (the 'bf16' base is this dtype)");
            foreach (var line in QualityBenchmark.Table(rows)) stdout.WriteLine(line);
            foreach (var line in QualityBenchmark.SeedSummary(rows)) stdout.WriteLine(line);
            if (QualityBenchmark.Targets(rows) is { } t)
                stdout.WriteLine($"NF4+DQ vs bf16 after training{(seedList is { Count: > 1 } ? " (medians of the per-seed differences)" : "")}: eval loss {t.LossRatio * 100:+0.00;-0.00} % (target within 2 %), exact match {t.ExactMatchPoints:+0.0;-0.0} points (target within 2): {(t.Met ? "met" : "not met")}");
            if (QualityBenchmark.CompareLoss(rows) is { } cmp)
                stdout.WriteLine($"NF4+DQ / bf16 eval loss over {cmp.Seeds} seeds: geometric mean {cmp.Change * 100:+0.0;-0.0} %, 95 % interval {cmp.Low * 100:+0.0;-0.0} % to {cmp.High * 100:+0.0;-0.0} % " +
                    $"(target within 2 %: {cmp.Verdict}{(cmp.Verdict == "undecided" ? ": the seeds' spread is larger than the target; more seeds narrow the interval" : "")})");
            stdout.WriteLine(QualityBenchmark.ToJson(rows, steps));
            return 0;
        });
        return cmd;
    }
}
