using System.CommandLine;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// <c>qlora eval --model &lt;folder&gt; [--adapter &lt;folder&gt;] --data &lt;jsonl&gt; [--config job.json] [--device d]
/// [--Section:Key value ...]</c>: eval loss, perplexity, greedy exact match and multiple-choice accuracy of a model with the
/// job's settings (template, Data:MaxSeqLength, quantization, Eval:BatchSize) and the job's own evaluation code. The last
/// line is the figures as JSON.
/// </summary>
internal static class EvalVerb
{
    public static Command Create(TextWriter stdout)
    {
        var config = new Option<string?>("--config") { Description = "the job file whose settings apply (default: ./appsettings.json)" };
        var model = new Option<string?>("--model") { Description = "the model folder (default: the job's Model:Path)" };
        var adapter = new Option<string?>("--adapter") { Description = "a PEFT adapter folder to apply (e.g. out/quickstart)" };
        var data = new Option<string?>("--data") { Description = "JSONL: samples (loss, exact match) and/or {\"question\", \"choices\", \"answer\"} lines (default: the job's Data:EvalFile)" };
        var device = new Option<string?>("--device") { Description = $"where to compute: {DeviceRequest.Allowed} (default: the job's Model:Device)" };
        var cmd = new Command("eval", "Evaluate a model (and adapter) on a JSONL file: eval loss, perplexity, exact match, multiple-choice accuracy; overrides as --Section:Key value (e.g. --Quantization:QuantType none).")
        {
            config, model, adapter, data, device,
        };
        cmd.TreatUnmatchedTokensAsErrors = false;
        cmd.SetAction(r =>
        {
            var jobPath = r.GetValue(config) ?? Path.Combine(Directory.GetCurrentDirectory(), "appsettings.json");
            var overrides = r.UnmatchedTokens.ToList();
            // Paths given on the command line are relative to the current folder, not to the job file.
            if (r.GetValue(model) is { } m) overrides.AddRange(["--Model:Path", Path.GetFullPath(m)]);
            if (r.GetValue(data) is { } dataPath) overrides.AddRange(["--Data:EvalFile", Path.GetFullPath(dataPath)]);
            if (r.GetValue(device) is { } dev) overrides.AddRange(["--Model:Device", dev]);
            var job = JobConfiguration.LoadTrainJob(jobPath, overrides, unused: EvalRun.UnusedKeys);
            var file = job.Data.EvalFile ?? throw new ArgumentException("no data to evaluate: give --data <jsonl> (or set Data:EvalFile in the job)");
            var report = EvalRun.Run(job, new EvalRun.Options { Data = file, Adapter = r.GetValue(adapter) is { } a ? Path.GetFullPath(a) : null, Log = stdout.WriteLine });
            stdout.WriteLine(report.ToJsonLine());
            return 0;
        });
        return cmd;
    }
}
