using System.CommandLine;
using System.Globalization;
using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary><c>qlora merge-adapters</c>: several PEFT adapters of one base → one new PEFT adapter (PEFT's add_weighted_adapter).</summary>
internal static class MergeAdaptersVerb
{
    public static Command Create(TextWriter stdout)
    {
        var adapters = new Option<string[]>("--adapter") { Description = "a PEFT adapter folder; repeat for each adapter, in the order of --weights", Required = true, Arity = ArgumentArity.OneOrMore };
        var weights = new Option<string>("--weights") { Description = "one weight per adapter, comma-separated (e.g. 0.7,0.3; a negative weight subtracts)", Required = true };
        var combination = new Option<string>("--combination") { Description = "how to combine, by PEFT's combination_type names (PEFT's default, svd)", DefaultValueFactory = _ => "svd" };
        combination.AcceptOnlyFromAmong([.. AdapterCombinations.Names]);
        var density = new Option<double?>("--density") { Description = "fraction of values each adapter keeps, in (0, 1]: ties, dare_linear, dare_ties, magnitude_prune and their _svd kinds" };
        var majority = new Option<string?>("--majority-sign-method") { Description = "ties / dare_ties sign election: total (default) or frequency" };
        majority.AcceptOnlyFromAmong("total", "frequency");
        var svdRank = new Option<int?>("--svd-rank") { Description = "rank of an svd kind's result (default: the largest input rank)" };
        var svdClamp = new Option<double?>("--svd-clamp") { Description = "clamp an svd kind's factors to ± this quantile of their values (e.g. 0.99)" };
        var seed = new Option<ulong>("--seed") { Description = "seed of DARE's random pruning (SplitMix64)", DefaultValueFactory = _ => 42UL };
        var baseOpt = new Option<string?>("--base") { Description = "the base model folder, to check every adapter (and the result) against its projections" };
        var output = new Option<string>("--output") { Description = "the adapter folder to write", Required = true };
        var overwrite = new Option<bool>("--overwrite") { Description = "replace an existing output folder once the new one is complete" };
        var cmd = new Command("merge-adapters", "Combine LoRA adapters of one base into one PEFT adapter: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune (PEFT's add_weighted_adapter).")
        {
            adapters, weights, combination, density, majority, svdRank, svdClamp, seed, baseOpt, output, overwrite,
        };
        // Settings that cannot work whatever the files hold are usage errors (exit code 2), like a missing option.
        cmd.Validators.Add(c =>
        {
            try
            {
                Build(c.GetValue(combination), c.GetValue(weights), c.GetValue(density), c.GetValue(majority), c.GetValue(svdRank), c.GetValue(svdClamp), c.GetValue(seed))
                    .Validate(c.GetValue(adapters)?.Length ?? 0);
            }
            catch (ArgumentException e) { c.AddError(e.Message); }
            catch (InvalidOperationException) { } // an option's own parse error (e.g. an unknown --combination) is already reported
        });
        cmd.SetAction(r =>
        {
            var folders = r.GetValue(adapters)!;
            string o = r.GetValue(output)!;
            string? b = r.GetValue(baseOpt);
            foreach (var a in folders) InputPaths.RequireFolder("--adapter", a, "a PEFT adapter folder");
            if (b is not null) InputPaths.RequireFolder("--base", b, "a Hugging Face model folder");
            PathOverlap.Refuse("--output", o, [.. folders.Select(a => ("--adapter", a)), .. b is null ? Array.Empty<(string, string)>() : [("--base", b)]]);
            StagedFolder.CleanLeftoversBeside(o, stdout.WriteLine);
            var options = Build(r.GetValue(combination), r.GetValue(weights), r.GetValue(density), r.GetValue(majority), r.GetValue(svdRank), r.GetValue(svdClamp), r.GetValue(seed));
            var report = WeightedAdapterMerger.Merge(folders, options, o, b, r.GetValue(overwrite), stdout.WriteLine);
            stdout.WriteLine($"wrote {o}: {report.Modules} modules, r = lora_alpha = {report.Rank}, {report.DType}, {report.OutputBytes:N0} bytes of weights");
            stdout.WriteLine(Json.Line(new
            {
                verb = "merge-adapters", combination = report.Combination.Name(), adapters = folders.Length, weights = options.Weights,
                density = options.Density, seed = options.Combination.Method() is TaskMergeMethod.DareLinear or TaskMergeMethod.DareTies ? options.Seed : (ulong?)null,
                modules = report.Modules, r = report.Rank, dtype = report.DType, bytes = report.OutputBytes,
            }));
            return 0;
        });
        return cmd;
    }

    private static AdapterMergeOptions Build(string? combination, string? weights, double? density, string? majority, int? svdRank, double? svdClamp, ulong seed) => new()
    {
        Combination = AdapterCombinations.Parse(combination ?? "svd"),
        Weights = weights is null ? [] : ParseWeights(weights),
        Density = density,
        MajoritySign = majority switch { null => null, "frequency" => MajoritySignMethod.Frequency, _ => MajoritySignMethod.Total },
        SvdRank = svdRank,
        SvdClamp = svdClamp,
        Seed = seed,
    };

    /// <summary>"0.7,0.3" → [0.7, 0.3] (invariant culture); a bad list is an <see cref="ArgumentException"/> naming --weights.</summary>
    internal static double[] ParseWeights(string text)
    {
        var parts = text.Split(',', StringSplitOptions.TrimEntries);
        var values = new double[parts.Length];
        for (int i = 0; i < parts.Length; i++)
        {
            if (!double.TryParse(parts[i], NumberStyles.Float, CultureInfo.InvariantCulture, out values[i]))
                throw new ArgumentException($"--weights '{text}': '{parts[i]}' is not a number; give one weight per --adapter, comma-separated (e.g. 0.7,0.3)");
        }
        return values;
    }
}
