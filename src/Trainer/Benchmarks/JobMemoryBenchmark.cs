using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// Measures a whole real training job, as <c>qlora train</c> runs it, on a Hugging Face model folder: the job file,
/// data and output folder are written under a scratch folder, <see cref="TrainingRun"/> loads the model (quantizing a
/// dense folder on load, or taking a bnb-4bit one as stored, optionally streamed), trains the steps, evaluates, saves a
/// checkpoint and the adapter; the caller's <see cref="PeakMemorySampler"/> (its baseline taken before anything is
/// loaded) sees every phase and names the one the peak fell in. The planner's figure for the same job comes with it.
/// The data are byte-level text (the benchmark folders' tokenizer: one token per character), long enough that every
/// row is truncated to exactly the sequence length, as a real job's longest rows are.
/// </summary>
public static class JobMemoryBenchmark
{
    /// <summary>What to run.</summary>
    public sealed record Options
    {
        /// <summary>The Hugging Face model folder (its tokenizer must encode bytes; see <see cref="ByteLevelTokenizerFiles"/>).</summary>
        public required string ModelFolder { get; init; }
        /// <summary>Where the job file, data and output go (the output is replaced on every run).</summary>
        public required string WorkFolder { get; init; }
        /// <summary>Tokens per row.</summary>
        public int Sequence { get; init; } = 512;
        /// <summary>Optimizer steps.</summary>
        public int Steps { get; init; } = 1;
        /// <summary>Evaluation rows (evaluated once, after the last step).</summary>
        public int EvalRows { get; init; } = 2;
        /// <summary>LoRA rank on every linear layer (alpha = 2·rank).</summary>
        public int Rank { get; init; } = 16;
        /// <summary>Stream the decoder layers (a bnb-4bit folder).</summary>
        public bool Stream { get; init; }
        /// <summary>Layers resident when streaming.</summary>
        public int StreamWindow { get; init; } = 2;
        /// <summary>Tokens per loss chunk (null: the job default).</summary>
        public int? LossChunkTokens { get; init; }
        /// <summary>MLP tiles, norm tiles and attention by K/V group, written into the job's Training section.</summary>
        public LongContextSwitches LongContext { get; init; } = new();
    }

    /// <summary>The figures of one job.</summary>
    public sealed record Result(TrainingRun.Result Run, MemoryPlan Plan, TrainJob Job, string JobFile);

    /// <summary>Writes the job and its data, plans it, and runs it with <paramref name="sampler"/> watching.</summary>
    public static Result Run(Options o, PeakMemorySampler sampler, Action<string>? log = null)
    {
        if (o.Sequence < 2) throw new ArgumentException($"--seq {o.Sequence}: a step needs at least 2 tokens");
        if (o.Steps <= 0) throw new ArgumentException($"--steps {o.Steps}: must be positive");
        if (o.EvalRows < 0) throw new ArgumentException($"--eval-rows {o.EvalRows}: must be 0 or more");
        if (!File.Exists(Path.Combine(o.ModelFolder, "config.json")))
            throw new DirectoryNotFoundException($"--from-folder {o.ModelFolder}: no config.json there; point it at a Hugging Face model folder");
        Directory.CreateDirectory(o.WorkFolder);
        string train = Path.Combine(o.WorkFolder, "train.jsonl"), eval = Path.Combine(o.WorkFolder, "eval.jsonl");
        WriteText(train, o.Steps, o.Sequence, seed: 1);
        WriteText(eval, Math.Max(o.EvalRows, 1), o.Sequence, seed: 2);
        var job = new JsonObject
        {
            ["Model"] = new JsonObject { ["Path"] = Path.GetFullPath(o.ModelFolder), ["Stream"] = o.Stream, ["StreamWindow"] = o.StreamWindow, ["Device"] = "cpu" }, // measured as host memory
            ["Lora"] = new JsonObject { ["Rank"] = o.Rank, ["Alpha"] = 2 * o.Rank },
            ["Data"] = new JsonObject
            {
                ["TrainFile"] = Path.GetFullPath(train), ["EvalFraction"] = 0,
                ["Format"] = "text", ["MaxSeqLength"] = o.Sequence, ["Packing"] = false, ["Shuffle"] = false,
            },
            ["Training"] = new JsonObject { ["MaxSteps"] = o.Steps, ["PagedOptimizer"] = true, ["WarmupSteps"] = 0, ["Seed"] = 7 },
            ["Eval"] = new JsonObject { ["MaxRows"] = o.EvalRows },
            ["Output"] = new JsonObject { ["Dir"] = Path.GetFullPath(Path.Combine(o.WorkFolder, "out")), ["Overwrite"] = true, ["KeepLast"] = 1 },
        };
        if (o.EvalRows > 0) job["Data"]!["EvalFile"] = Path.GetFullPath(eval);
        if (o.LossChunkTokens is int chunk) job["Training"]!["LossChunkTokens"] = chunk;
        job["Training"]!["MlpTileTokens"] = o.LongContext.MlpTileTokens;
        job["Training"]!["NormTileTokens"] = o.LongContext.NormTileTokens;
        job["Training"]!["AttentionByGroup"] = o.LongContext.AttentionByGroup;
        string jobFile = Path.Combine(o.WorkFolder, "job.json");
        File.WriteAllText(jobFile, job.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true, NewLine = "\n" }));
        var trainJob = JobConfiguration.LoadTrainJob(jobFile, environment: false);
        var config = LlamaConfig.Load(Path.Combine(o.ModelFolder, "config.json"));
        var plan = MemoryPlanner.Plan(config, TrainingRun.PlanOptionsOf(trainJob));
        log?.Invoke($"job: {jobFile}; planned peak {ByteSize.Format(plan.PeakBytes)} ({plan.PeakPhase})");
        var run = TrainingRun.Run(trainJob, new TrainingRun.RunOptions { Log = log, MemorySampler = sampler });
        return new Result(run, plan, trainJob, jobFile);
    }

    /// <summary><paramref name="rows"/> text samples of random lowercase words, each longer than <paramref name="sequence"/> tokens.</summary>
    private static void WriteText(string path, int rows, int sequence, int seed)
    {
        var rng = new Random(seed);
        var lines = new List<string>();
        for (int r = 0; r < rows; r++)
        {
            var sb = new System.Text.StringBuilder();
            while (sb.Length < sequence + 16)
            {
                int len = rng.Next(2, 9);
                for (int k = 0; k < len; k++) sb.Append((char)('a' + rng.Next(26)));
                sb.Append(' ');
            }
            lines.Add(new JsonObject { ["text"] = sb.ToString() }.ToJsonString());
        }
        File.WriteAllText(path, string.Concat(lines.Select(l => l + "\n"))); // LF on every OS, as JSONL tools expect
    }
}
