using QLora.Quant;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// <c>qlora eval</c>'s recipe: a model (optionally with a PEFT adapter) loaded as a job would train it (compute dtype,
/// quantization or none, device), evaluated on a JSONL file with the job's own evaluation code (<see cref="Evaluation"/>,
/// the one <c>qlora train</c> uses): eval loss and perplexity over the samples' targets (the job's template, masking,
/// Data:MaxSeqLength and packing), greedy exact match on samples that end with an answer (Eval:BatchSize at a time), and
/// multiple-choice accuracy by log-likelihood on <c>{"question", "choices", "answer"}</c> lines.
/// </summary>
public static class EvalRun
{
    /// <summary>Job keys evaluation does not read, so a job without them is still a valid eval job.</summary>
    public static readonly IReadOnlyList<string> UnusedKeys = ["Data:TrainFile", "Output:Dir"];

    /// <summary>What to evaluate besides the job.</summary>
    public sealed record Options
    {
        /// <summary>The JSONL file: samples, multiple-choice items, or both.</summary>
        public required string Data { get; init; }
        /// <summary>A PEFT adapter folder applied to the base, or null for the base alone.</summary>
        public string? Adapter { get; init; }
        /// <summary>Progress lines.</summary>
        public Action<string>? Log { get; init; }
    }

    /// <summary>The figures (null where the data had nothing to measure).</summary>
    public sealed record Report
    {
        /// <summary>The model folder.</summary>
        [JsonPropertyName("model")] public string Model { get; init; } = "";
        /// <summary>The adapter folder, or null.</summary>
        [JsonPropertyName("adapter")] public string? Adapter { get; init; }
        /// <summary>The data file.</summary>
        [JsonPropertyName("data")] public string Data { get; init; } = "";
        /// <summary>nf4, fp4 or none.</summary>
        [JsonPropertyName("quant_type")] public string QuantType { get; init; } = "";
        /// <summary>Double quantization (for nf4/fp4).</summary>
        [JsonPropertyName("double_quant")] public bool? DoubleQuant { get; init; }
        /// <summary>Mean loss per target token.</summary>
        [JsonPropertyName("eval_loss")] public double? EvalLoss { get; init; }
        /// <summary>exp(eval loss).</summary>
        [JsonPropertyName("eval_perplexity")] public double? EvalPerplexity { get; init; }
        /// <summary>Samples the loss was taken over.</summary>
        [JsonPropertyName("eval_samples")] public int EvalSamples { get; init; }
        /// <summary>Greedy exact match.</summary>
        [JsonPropertyName("exact_match")] public double? ExactMatch { get; init; }
        /// <summary>Samples exact match was measured on.</summary>
        [JsonPropertyName("exact_match_samples")] public int? ExactMatchSamples { get; init; }
        /// <summary>Multiple-choice accuracy by summed log-likelihood.</summary>
        [JsonPropertyName("mc_acc")] public double? MultipleChoiceAccuracy { get; init; }
        /// <summary>Multiple-choice accuracy by log-likelihood per character of the choice.</summary>
        [JsonPropertyName("mc_acc_norm")] public double? MultipleChoiceAccuracyNorm { get; init; }
        /// <summary>Multiple-choice items scored.</summary>
        [JsonPropertyName("mc_items")] public int? MultipleChoiceItems { get; init; }
        /// <summary>Wall time, loading included.</summary>
        [JsonPropertyName("wall_s")] public double WallSeconds { get; init; }

        /// <summary>The figures as one JSON line.</summary>
        public string ToJsonLine() => JsonSerializer.Serialize(this, Line);

        static readonly JsonSerializerOptions Line = new() { DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };
    }

    /// <summary>Evaluates the job's model (Model:Path) on <see cref="Options.Data"/>.</summary>
    public static Report Run(TrainJob job, Options o)
    {
        var wall = Stopwatch.StartNew();
        var log = o.Log ?? (_ => { });
        var problems = job.Validate().Where(p => !UnusedKeys.Any(k => p.StartsWith(k + " = ", StringComparison.Ordinal))).ToList();
        if (problems.Count > 0) throw new FormatException(string.Join("; ", problems));
        var modelPath = job.Model.Path!;
        InputPaths.RequireFolder("--model", modelPath, "a Hugging Face model folder");
        if (o.Adapter is { } adapterPath) InputPaths.RequireFolder("--adapter", adapterPath, "a PEFT adapter folder");
        var d = job.Data;
        var (samples, items) = EvalDataset.Read(o.Data, TrainingRun.FormatOf(d));
        var device = DeviceSelector.Resolve(job.Model.Device, "Model:Device", log);
        if (job.Training.Threads > 0) set_num_threads(job.Training.Threads);
        manual_seed(job.Training.Seed);
        using var tokenizer = HfTokenizer.Load(modelPath);
        var template = TrainingRun.ChooseTemplate(tokenizer, job.Model.ChatTemplate, log);
        var encoder = new SampleEncoder(tokenizer, template, d.MaxSeqLength, d.TrainOnPrompt);
        int truncated = 0, cut = 0, empty = 0;
        var rows = TrainingRun.EncodeRows(samples, encoder, d, ref truncated, ref cut, ref empty, out long tokens);
        log($"data: {samples.Count} samples ({tokens:N0} tokens in {rows.Count} rows; {truncated} truncated{(cut > 0 ? $", {cut} of them cut to {encoder.MaxTextChars:N0} characters before tokenizing" : "")}, {empty} without target tokens) and {items.Count} multiple-choice items from {o.Data}");

        using var model = HfModelLoader.Load(modelPath, TrainingRun.LoaderOptionsOf(job, device.Torch), log);
        tokenizer.EnsureMatchesEmbedding(model.Config.VocabSize);
        job.Training.LongContext.Apply(model);
        model.SegmentAttention = job.Training.SegmentAttention;
        model.LossChunkTokens = job.Training.LossChunkTokens;
        if (o.Adapter is { } adapter)
        {
            var lora = PeftAdapter.Load(model, adapter);
            log($"adapter: {adapter} (r={lora.Rank}, alpha={lora.Alpha})");
        }
        using var ranks = DataParallel.Single();
        var evaluation = new Evaluation(model, tokenizer, encoder, rows, samples, job.Eval, TrainingRun.PadIdOf(tokenizer), log, ranks,
            items, TrainingRun.ChoicesAsText(job));
        double loss = evaluation.Loss();
        if (!double.IsNaN(loss)) log($"eval loss {loss:F4}, perplexity {Math.Exp(loss):F3} over {samples.Count - empty} samples");
        int emCount = Evaluation.ExactMatchCount(samples, job.Eval);
        double? em = emCount > 0 ? evaluation.ExactMatch("on the data") : null;
        var mc = evaluation.MultipleChoice("on the data");
        var q = job.Quantization;
        return new Report
        {
            Model = modelPath,
            Adapter = o.Adapter,
            Data = o.Data,
            QuantType = q.QuantType.ToLowerInvariant(),
            DoubleQuant = q.QuantizesBase ? q.DoubleQuant : null,
            EvalLoss = double.IsNaN(loss) ? null : loss, // unrounded: the same figure the training loop's evaluation gives
            EvalPerplexity = double.IsNaN(loss) ? null : Math.Round(Math.Exp(loss), 4),
            EvalSamples = samples.Count - empty,
            ExactMatch = em,
            ExactMatchSamples = em is null ? null : emCount,
            MultipleChoiceAccuracy = mc is null ? null : Math.Round(mc.Accuracy, 6),
            MultipleChoiceAccuracyNorm = mc is null ? null : Math.Round(mc.AccuracyNorm, 6),
            MultipleChoiceItems = mc?.Items,
            WallSeconds = Math.Round(wall.Elapsed.TotalSeconds, 2),
        };
    }
}
