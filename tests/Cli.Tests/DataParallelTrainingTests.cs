using System.Diagnostics;
using System.Text.Json.Nodes;
using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli.Tests;

/// <summary>A tiny model with the quick start's byte-level tokenizer, a 20-step job, and its 1-rank and 2-rank runs (made once, lazily).</summary>
public sealed class DataParallelFixture : IDisposable
{
    public const int Steps = 20;
    public const double LearningRate = 0.003;
    readonly Lazy<(int? Exit, string Output)> _one, _two;

    internal TempDir Dir { get; } = new();

    public DataParallelFixture()
    {
        _one = new(() => Run(1, "one"));
        _two = new(() => Run(2, "two"));
        if (MpiJob.Mpirun is null) return;
        var repo = RepoRoot();
        TinyHfFolder.Write(Dir["model"], vocab: 259);
        foreach (var f in new[] { "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json" })
            File.Copy(Path.Combine(repo, "models", "tiny-llama-base", f), Path.Combine(Dir["model"], f), overwrite: true);
        File.WriteAllLines(Dir["train.jsonl"], File.ReadLines(Path.Combine(repo, "data", "quickstart", "train.jsonl")).Take(240));
        File.WriteAllLines(Dir["eval.jsonl"], File.ReadLines(Path.Combine(repo, "data", "quickstart", "eval.jsonl")).Take(12));
        var job = new JsonObject
        {
            ["Model"] = new JsonObject { ["Path"] = "model", ["ComputeDType"] = "float32", ["ChatTemplate"] = "mistral" },
            ["Lora"] = new JsonObject { ["Rank"] = 4, ["Alpha"] = 8 },
            ["Data"] = new JsonObject { ["TrainFile"] = "train.jsonl", ["EvalFile"] = "eval.jsonl", ["MaxSeqLength"] = 128 },
            ["Training"] = new JsonObject
            {
                ["Seed"] = 3, ["MaxSteps"] = Steps, ["MicroBatchSize"] = 2, ["GradientAccumulationSteps"] = 4, ["LearningRate"] = LearningRate,
                ["WarmupSteps"] = 2, ["Threads"] = 1, ["CollectiveTimeoutSeconds"] = 60,
            },
            ["Eval"] = new JsonObject { ["EveryNSteps"] = 10, ["MaxRows"] = 7 },
            ["Output"] = new JsonObject { ["Dir"] = "out", ["SaveEveryNSteps"] = 5, ["KeepLast"] = 10 },
        };
        File.WriteAllText(Job, job.ToJsonString());
    }

    public string Job => Dir["job.json"];

    /// <summary>The uninterrupted 1-rank run (mpirun -np 1: the single-process path) and 2-rank run.</summary>
    public (int? Exit, string Output) One => _one.Value;
    public (int? Exit, string Output) Two => _two.Value;

    (int? Exit, string Output) Run(int ranks, string output)
    {
        using var job = new MpiJob(ranks, Dir.Path, "train", "--config", Job, "--Output:Dir", Dir[output]);
        var exit = job.WaitForExit(TimeSpan.FromMinutes(4));
        return (exit, job.Output);
    }

    public static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "QLora.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("QLora.sln not found above the test binaries");
    }

    public static double[] Losses(string outDir) =>
        [.. File.ReadAllLines(Path.Combine(outDir, "train_log.jsonl")).Select(l => JsonNode.Parse(l)!["loss"]!.GetValue<double>())];

    public static Dictionary<string, float[]> Adapter(string outDir)
    {
        using var st = SafetensorsReader.Open(Path.Combine(outDir, "adapter_model.safetensors"));
        return st.Tensors.ToDictionary(t => t.Name, t => st.Read<float>(t.Name));
    }

    public void Dispose() => Dir.Dispose();
}

/// <summary>
/// Data-parallel training under Open MPI's mpirun (2 ranks on this machine, one thread each); skipped when mpirun is
/// not installed (.ci/run installs it).
/// </summary>
public class DataParallelTrainingTests(DataParallelFixture f) : IClassFixture<DataParallelFixture>
{
    static void SkipWithoutMpi() => Skip.If(MpiJob.Mpirun is null, "Open MPI's mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");

    [SkippableFact]
    public void TwoRanksTrainTheSameGlobalBatchAsOneRankWithinFloat32SummationRounding()
    {
        SkipWithoutMpi();
        var (exit1, out1) = f.One;
        var (exit2, out2) = f.Two;
        Assert.True(exit1 == 0, out1);
        Assert.True(exit2 == 0, out2);
        Assert.DoesNotContain("data parallel", out1);
        Assert.Single(out2.Split('\n'), l => l.StartsWith("data parallel: 2 ranks over Open MPI", StringComparison.Ordinal));
        Assert.Single(out2.Split('\n'), l => l.StartsWith("{\"steps\":", StringComparison.Ordinal)); // rank 0 alone reports

        string one = f.Dir["one"], two = f.Dir["two"];
        var s1 = JsonNode.Parse(File.ReadAllText(Path.Combine(one, "run_summary.json")))!;
        var s2 = JsonNode.Parse(File.ReadAllText(Path.Combine(two, "run_summary.json")))!;
        // The same rows: the global batches hold exactly the same tokens.
        Assert.Equal(s1["tokens"]!.GetValue<long>(), s2["tokens"]!.GetValue<long>());
        // Each step's gradient is the same sum of per-micro-batch gradients, associated differently: ((g1+g2)+g3)+g4 in
        // one process, (g1+g2)+(g3+g4) over two ranks. In float32 the two differ by at most (K-1)·2^-24·Σ|g_i| per
        // element (K = 4), a relative 2e-7 for elements whose parts do not cancel; losses therefore agree to ~1e-6.
        var l1 = DataParallelFixture.Losses(one);
        var l2 = DataParallelFixture.Losses(two);
        Assert.Equal(DataParallelFixture.Steps, l1.Length);
        Assert.Equal(DataParallelFixture.Steps, l2.Length);
        for (int i = 0; i < l1.Length; i++) Assert.True(Math.Abs(l1[i] - l2[i]) <= 1e-5 * Math.Abs(l1[i]), $"step {i + 1}: {l1[i]} vs {l2[i]}");
        Assert.True(Math.Abs(s1["eval_loss"]!.GetValue<double>() - s2["eval_loss"]!.GetValue<double>()) <= 1e-5 * s1["eval_loss"]!.GetValue<double>());
        // AdamW divides each element by its own running magnitude, so an element whose micro-batch parts nearly cancel
        // can move by a larger fraction of its (tiny) update; no update exceeds ~lr per step, and we bound the drift of
        // any weight after S steps by 1e-3·lr·S (a thousandth of the largest possible movement).
        var w1 = DataParallelFixture.Adapter(one);
        var w2 = DataParallelFixture.Adapter(two);
        Assert.Equal(w1.Keys.Order(), w2.Keys.Order());
        double bound = 1e-3 * DataParallelFixture.LearningRate * DataParallelFixture.Steps, worst = 0;
        foreach (var (name, a) in w1)
            for (int i = 0; i < a.Length; i++) worst = Math.Max(worst, Math.Abs(a[i] - w2[name][i]));
        Assert.True(worst <= bound, $"largest LoRA weight difference {worst:E3} > bound {bound:E3}");
    }

    [SkippableFact]
    public void ATwoRankRunStoppedBySigtermOnOneRankResumesToExactlyTheUninterruptedRun()
    {
        SkipWithoutMpi();
        var (exit2, out2) = f.Two;
        Assert.True(exit2 == 0, out2);
        string dir = f.Dir["resumed"];
        using (var stopped = new MpiJob(2, f.Dir.Path, "train", "--config", f.Job, "--Output:Dir", dir))
        {
            Assert.True(stopped.WaitForLine(l => l.StartsWith("data:", StringComparison.Ordinal), TimeSpan.FromMinutes(2)), stopped.Output);
            MpiJob.Signal(stopped.RankPid(1), "TERM"); // rank 1 alone is asked to stop: both stop at the same step
            var exit = stopped.WaitForExit(TimeSpan.FromMinutes(2));
            Assert.True(exit is not null and not 0, stopped.Output);
            Assert.Contains("interrupted at step", stopped.Output);
        }
        var checkpoints = new TrainingCheckpoints(Path.Combine(dir, "checkpoints"), 10);
        var latest = checkpoints.Latest();
        Assert.NotNull(latest);
        int at = checkpoints.List()[0].Step;
        Assert.InRange(at, 1, DataParallelFixture.Steps - 1);
        // The stopped run repeats the uninterrupted 2-rank run bit for bit up to where it stopped.
        var full = DataParallelFixture.Losses(f.Dir["two"]);
        Assert.Equal(full.Take(at), DataParallelFixture.Losses(dir));

        using (var resumed = new MpiJob(2, f.Dir.Path, "train", "--config", f.Job, "--Output:Dir", dir, "--resume", "latest"))
        {
            var exit = resumed.WaitForExit(TimeSpan.FromMinutes(4));
            Assert.True(exit == 0, resumed.Output);
            Assert.Contains($"resumed from {latest}", resumed.Output);
        }
        Assert.Equal(full, DataParallelFixture.Losses(dir)); // bit-identical doubles
        Assert.Equal(File.ReadAllBytes(Path.Combine(f.Dir["two"], "adapter_model.safetensors")), File.ReadAllBytes(Path.Combine(dir, "adapter_model.safetensors")));
    }

    /// <summary>A 2-rank job far longer than the test, with a 20 s collective timeout, once it has written a checkpoint.</summary>
    MpiJob LongJobWithACheckpoint(string dir)
    {
        var job = new MpiJob(2, f.Dir.Path, "train", "--config", f.Job, "--Output:Dir", dir, "--Training:MaxSteps", "5000",
            "--Output:SaveEveryNSteps", "2", "--Eval:EveryNSteps", "0", "--Training:CollectiveTimeoutSeconds", "20");
        if (!job.WaitForLine(l => l.StartsWith("checkpoint ", StringComparison.Ordinal), TimeSpan.FromMinutes(2)))
        {
            var output = job.Output;
            job.Dispose();
            Assert.Fail("no checkpoint within 2 minutes: " + output);
        }
        return job;
    }

    [SkippableFact]
    public void KillingOneRankEndsTheJobWithAnErrorNamingItAndTheLastCheckpointIntact()
    {
        SkipWithoutMpi();
        string dir = f.Dir["killed"];
        using var job = LongJobWithACheckpoint(dir);
        var sw = Stopwatch.StartNew();
        MpiJob.Signal(job.RankPid(1), "KILL");
        var exit = job.WaitForExit(TimeSpan.FromSeconds(90));
        Assert.True(exit is not null and not 0, job.Output);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), $"took {sw.Elapsed}");
        Assert.Contains("rank 1", job.Output);
        Assert.NotNull(new TrainingCheckpoints(Path.Combine(dir, "checkpoints"), 10).Latest());
    }

    [SkippableFact]
    public void AStoppedRankMakesTheOthersFailWithinTheCollectiveTimeoutNamingIt()
    {
        SkipWithoutMpi();
        string dir = f.Dir["hung"];
        using var job = LongJobWithACheckpoint(dir);
        var sw = Stopwatch.StartNew();
        MpiJob.Signal(job.RankPid(1), "STOP"); // hung, not dead: the launcher cannot tell; only the timeout can
        var exit = job.WaitForExit(TimeSpan.FromSeconds(120));
        Assert.True(exit is not null and not 0, job.Output);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(90), $"took {sw.Elapsed}"); // the 20 s timeout, plus a loaded machine's slack
        Assert.Matches(@"rank 0: rank 1 did not reach the .* of step \d+ within 20 s", job.Output);
        Assert.NotNull(new TrainingCheckpoints(Path.Combine(dir, "checkpoints"), 10).Latest());
    }
}
