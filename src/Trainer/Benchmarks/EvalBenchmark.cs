using System.Diagnostics;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// <c>qlora bench eval</c>: the training job's greedy exact match decoded one sample at a time against left-padded batches
/// sharing a KV cache, alternated in one run (so a busy machine slows both alike), with both scores to show they agree.
/// It also counts the samples whose answers are identical token for token. This is the job's own evaluation code (<c>Eval:BatchSize</c> 1 vs N), on the model as loaded for training.
/// </summary>
public static class EvalBenchmark
{
    /// <summary>What to measure.</summary>
    public sealed record Options
    {
        /// <summary>The base model folder.</summary>
        public required string Model { get; init; }
        /// <summary>A PEFT adapter folder to apply, or null for the base model.</summary>
        public string? Adapter { get; init; }
        /// <summary>The eval JSONL file (samples ending with an assistant answer are scored).</summary>
        public required string EvalFile { get; init; }
        /// <summary>Chat template name, or null for the tokenizer's own.</summary>
        public string? Template { get; init; }
        /// <summary>Samples scored (0: all).</summary>
        public int Samples { get; init; } = 100;
        /// <summary>Generation limit per answer.</summary>
        public int MaxNewTokens { get; init; } = 16;
        /// <summary>The batched variant's batch size.</summary>
        public int BatchSize { get; init; } = 16;
        /// <summary>Timed runs of each variant (alternating); the medians are reported.</summary>
        public int Repeats { get; init; } = 3;
        /// <summary>The compute dtype (the quick start trains in bfloat16).</summary>
        public ScalarType ComputeDType { get; init; } = ScalarType.BFloat16;
    }

    /// <summary>Medians and scores of both variants.</summary>
    public sealed record Result(int Samples, int BatchSize, double SequentialSeconds, double BatchedSeconds, double SequentialExactMatch,
        double BatchedExactMatch, int IdenticalAnswers, IReadOnlyList<double> SequentialRuns, IReadOnlyList<double> BatchedRuns)
    {
        /// <summary>Sequential median over batched median.</summary>
        public double Speedup => SequentialSeconds / BatchedSeconds;

        /// <summary>The one JSON line.</summary>
        public string ToJson() => System.Text.Json.JsonSerializer.Serialize(new
        {
            bench = "eval", samples = Samples, batch_size = BatchSize,
            sequential_s = Math.Round(SequentialSeconds, 3), batched_s = Math.Round(BatchedSeconds, 3), speedup = Math.Round(Speedup, 2),
            exact_match_sequential = SequentialExactMatch, exact_match_batched = BatchedExactMatch,
            identical_answers = IdenticalAnswers,
            sequential_runs_s = SequentialRuns.Select(s => Math.Round(s, 3)), batched_runs_s = BatchedRuns.Select(s => Math.Round(s, 3)),
        });
    }

    /// <summary>Runs both variants <see cref="Options.Repeats"/> times, alternating, and reports the medians.</summary>
    public static Result Run(Options o, Action<string> log)
    {
        if (o.Repeats < 1 || o.BatchSize < 2 || o.MaxNewTokens < 1 || o.Samples < 0)
            throw new ArgumentException("repeats and max new tokens must be >= 1, the batch size >= 2 and samples >= 0");
        using var tokenizer = HfTokenizer.Load(o.Model);
        using var model = HfModelLoader.Load(o.Model, new HfModelLoader.Options { ComputeDType = o.ComputeDType }, log);
        tokenizer.EnsureMatchesEmbedding(model.Config.VocabSize);
        if (o.Adapter is { } adapter) PeftAdapter.Load(model, adapter);
        var samples = JsonlDataset.Read(o.EvalFile).Samples.ToList();
        var encoder = new SampleEncoder(tokenizer, tokenizer.GetChatTemplate(o.Template), int.MaxValue);
        int padId = tokenizer.PadTokenId ?? tokenizer.EosTokenId ?? 0;
        using var ranks = DataParallel.Single();
        Evaluation Variant(int batch) => new(model, tokenizer, encoder, [], samples,
            new EvalSection { ExactMatch = true, ExactMatchSamples = o.Samples, MaxNewTokens = o.MaxNewTokens, BatchSize = batch }, padId, log, ranks);
        var sequential = Variant(1);
        var batched = Variant(o.BatchSize);
        var seqTimes = new List<double>();
        var batTimes = new List<double>();
        double seqScore = 0, batScore = 0;
        for (int r = 0; r < o.Repeats; r++)
        {
            var sw = Stopwatch.StartNew();
            seqScore = sequential.ExactMatch($"one at a time, run {r + 1}") ?? double.NaN;
            seqTimes.Add(sw.Elapsed.TotalSeconds);
            sw.Restart();
            batScore = batched.ExactMatch($"batches of {o.BatchSize}, run {r + 1}") ?? double.NaN;
            batTimes.Add(sw.Elapsed.TotalSeconds);
            log($"run {r + 1}: one at a time {seqTimes[^1]:F2} s, batches of {o.BatchSize} {batTimes[^1]:F2} s");
        }
        int n = Evaluation.ExactMatchCount(samples, new EvalSection { ExactMatchSamples = o.Samples });
        int identical = sequential.LastAnswers.Zip(batched.LastAnswers).Count(p => p.First.SequenceEqual(p.Second));
        return new Result(n, o.BatchSize, BenchStatistics.Median(seqTimes), BenchStatistics.Median(batTimes), seqScore, batScore, identical, seqTimes, batTimes);
    }
}
