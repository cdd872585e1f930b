using System.Text.Json.Nodes;

namespace QLora.Trainer.Tests;

public class TrainingRunTests
{
    [Fact]
    public void AJobRunsEndToEndAndWritesItsOutputs()
    {
        using var dir = new TempFolder();
        var jobPath = TrainJobFixture.WriteJob(dir.Path);
        var job = JobConfiguration.LoadTrainJob(jobPath, environment: false);
        var log = new List<string>();
        var result = TrainingRun.Run(job, new TrainingRun.RunOptions { Log = log.Add });
        var s = result.Summary;
        Assert.Equal(6, s.Steps);
        Assert.NotNull(s.EvalLoss);
        Assert.NotNull(s.ExactMatchBefore);
        Assert.NotNull(s.ExactMatchAfter);
        foreach (var f in new[] { "job.json", "run_summary.json", "train_log.jsonl", "adapter_config.json", "adapter_model.safetensors" })
            Assert.True(File.Exists(dir.File("out/" + f)), f);
        Assert.Equal(6, File.ReadAllLines(dir.File("out/train_log.jsonl")).Length);
        Assert.Equal([6, 4, 2], Directory.GetDirectories(dir.File("out/checkpoints")).Select(d => int.Parse(Path.GetFileName(d)[11..])).OrderDescending());
        Assert.All(Directory.GetDirectories(dir.File("out/checkpoints")), d => Assert.Null(TrainingCheckpoints.Verify(d)));
        Assert.Contains(log, l => l.StartsWith("eval at step 3", StringComparison.Ordinal));
    }
}

public class TrainingResumeTests
{
    static TrainingRun.Result RunJob(string jobPath, string? resume = null, int? cancelAt = null, List<string>? log = null)
    {
        var job = JobConfiguration.LoadTrainJob(jobPath, environment: false);
        using var cts = new CancellationTokenSource();
        return TrainingRun.Run(job, new TrainingRun.RunOptions
        {
            Resume = resume,
            Log = log is null ? null : log.Add,
            Cancellation = cts.Token,
            Progress = p => { if (p.Step == cancelAt) cts.Cancel(); },
        });
    }

    static double[] Losses(TrainingRun.Result r, int from) => r.State.History.Where(h => h.Step > from).Select(h => h.Loss).ToArray();

    [Fact]
    public void AnInterruptedRunResumedFromItsCheckpointReproducesTheUninterruptedLossesExactly()
    {
        using var a = new TempFolder();
        using var b = new TempFolder();
        var full = RunJob(TrainJobFixture.WriteJob(a.Path));
        var jobB = TrainJobFixture.WriteJob(b.Path);
        var stopped = RunJob(jobB, cancelAt: 3);
        Assert.True(stopped.Summary.Interrupted);
        Assert.Equal(3, stopped.Summary.Steps);
        Assert.EndsWith("checkpoint-000003", stopped.Summary.Checkpoint);
        Assert.Equal(Losses(full, 0).Take(3), Losses(stopped, 0));

        Assert.Throws<IOException>(() => RunJob(jobB)); // a fresh run would overwrite the interrupted one
        var resumed = RunJob(jobB, resume: "latest");
        Assert.Equal(3, resumed.Summary.ResumedFromStep);
        Assert.Equal(6, resumed.Summary.Steps);
        Assert.Equal(Losses(full, 3), Losses(resumed, 3)); // bit-identical doubles
        Assert.Equal(full.Summary.EvalLoss, resumed.Summary.EvalLoss);
        Assert.Equal(full.Summary.ExactMatchBefore, resumed.Summary.ExactMatchBefore);
        Assert.Equal(6, File.ReadAllLines(b.File("out/train_log.jsonl")).Length);
    }

    [Fact]
    public void ResumingAFinishedRunIsANoOpAndAResumeCutsTheLogBackToItsCheckpoint()
    {
        using var a = new TempFolder();
        using var b = new TempFolder();
        var jobA = TrainJobFixture.WriteJob(a.Path);
        var full = RunJob(jobA);
        var summary = File.ReadAllText(a.File("out/run_summary.json"));
        string[] StepsLogged(string dir) => File.ReadAllLines(Path.Combine(dir, "train_log.jsonl"))
            .Select(l => JsonNode.Parse(l)!["step"]!.ToString()).ToArray();

        // A finished run resumed: nothing trained, evaluated or written; it says so.
        var log = new List<string>();
        var again = RunJob(jobA, resume: "latest", log: log);
        Assert.Contains(log, l => l.Contains("already finished at step 6", StringComparison.Ordinal));
        Assert.Equal(6, again.Summary.Steps);
        Assert.Equal(full.State.EvalHistory.Count, again.State.EvalHistory.Count);
        Assert.Equal(summary, File.ReadAllText(a.File("out/run_summary.json")));
        Assert.Equal(["1", "2", "3", "4", "5", "6"], StepsLogged(a.File("out")));

        // Resumed from an older checkpoint (as after a kill at step 6 before its checkpoint): the log is cut back to it.
        var fromFour = RunJob(jobA, resume: a.File("out/checkpoints/checkpoint-000004"));
        Assert.Equal(4, fromFour.Summary.ResumedFromStep);
        Assert.Equal(["1", "2", "3", "4", "5", "6"], StepsLogged(a.File("out")));
        Assert.Equal(Losses(full, 4), Losses(fromFour, 4));

        // Another run's checkpoint into a new Output:Dir.
        var other = JobConfiguration.LoadTrainJob(jobA, ["--Output:Dir", b.File("new-out")], environment: false);
        var continued = TrainingRun.Run(other, new TrainingRun.RunOptions { Resume = a.File("out/checkpoints/checkpoint-000002") });
        Assert.Equal(2, continued.Summary.ResumedFromStep);
        Assert.Equal(Losses(full, 2), continued.State.History.Where(h => h.Step > 2).Select(h => h.Loss).ToArray());
        Assert.True(File.Exists(b.File("new-out/job.json")));
        Assert.Equal(["3", "4", "5", "6"], StepsLogged(b.File("new-out")));
    }

    [Fact]
    public void AFreshRunStoppedBeforeItsFirstCheckpointPutsThePreviousRunBack()
    {
        using var a = new TempFolder();
        var jobA = TrainJobFixture.WriteJob(a.Path, j => j["Eval"] = new JsonObject { ["ExactMatch"] = false });
        RunJob(jobA);
        var before = Directory.EnumerateFiles(a.File("out"), "*", SearchOption.AllDirectories).ToDictionary(f => f, File.ReadAllBytes);
        var job = JobConfiguration.LoadTrainJob(jobA, ["--Output:Overwrite", "true", "--Training:LearningRate", "0.5"], environment: false);
        using var cts = new CancellationTokenSource();
        cts.Cancel(); // Ctrl-C before the first step
        var log = new List<string>();
        var r = TrainingRun.Run(job, new TrainingRun.RunOptions { Cancellation = cts.Token, Log = log.Add });
        Assert.True(r.Summary.Interrupted);
        Assert.Contains(log, l => l.Contains("interrupted before the first step", StringComparison.Ordinal) && l.Contains("run the same command again", StringComparison.Ordinal));
        Assert.DoesNotContain(log, l => l.Contains("--resume latest", StringComparison.Ordinal)); // it would fail: no checkpoint
        var after = Directory.EnumerateFiles(a.File("out"), "*", SearchOption.AllDirectories).ToDictionary(f => f, File.ReadAllBytes);
        Assert.Equal(before.Keys.Order(), after.Keys.Order());
        foreach (var (f, bytes) in before) Assert.True(bytes.AsSpan().SequenceEqual(after[f]), f);

        // The same fresh run, not stopped: the previous run is replaced once the new one has a checkpoint.
        var replaced = TrainingRun.Run(job, new TrainingRun.RunOptions { Log = log.Add });
        Assert.Equal(6, replaced.Summary.Steps);
        Assert.False(Directory.Exists(a.File("out/" + RunOutputFolder.PreviousRunFolder)));
        Assert.Contains(log, l => l.StartsWith("removed the previous run's results", StringComparison.Ordinal));
    }

    [Fact]
    public void ADamagedCheckpointIsRefusedAndLatestFallsBackToThePreviousOne()
    {
        using var a = new TempFolder();
        var jobPath = TrainJobFixture.WriteJob(a.Path);
        var full = RunJob(jobPath);
        var newest = a.File("out/checkpoints/checkpoint-000006");
        var optimizer = Path.Combine(newest, "optimizer.safetensors");
        var bytes = File.ReadAllBytes(optimizer);
        File.WriteAllBytes(optimizer, bytes[..(bytes.Length / 2)]); // truncated, as by a crash mid-copy
        Assert.Contains("truncated", TrainingCheckpoints.Verify(newest));
        var e = Assert.Throws<InvalidDataException>(() => RunJob(jobPath, resume: newest));
        Assert.Contains("optimizer.safetensors", e.Message);

        // A folder that never got its manifest (killed while writing) is not a checkpoint either.
        var partial = a.File("out/checkpoints/checkpoint-000007");
        Directory.CreateDirectory(partial);
        File.WriteAllText(Path.Combine(partial, "trainer_state.json"), "{\"step\": 7");
        Assert.Contains("not completely written", TrainingCheckpoints.Verify(partial));

        var log = new List<string>();
        var resumed = RunJob(jobPath, resume: "latest", log: log);
        Assert.Equal(4, resumed.Summary.ResumedFromStep);
        Assert.Contains(log, l => l.Contains("skipping damaged checkpoint", StringComparison.Ordinal) && l.Contains("checkpoint-000007", StringComparison.Ordinal));
        Assert.Contains(log, l => l.Contains("skipping damaged checkpoint", StringComparison.Ordinal) && l.Contains("checkpoint-000006", StringComparison.Ordinal));
        Assert.Equal(Losses(full, 4), Losses(resumed, 4));
    }

    [Fact]
    public void GradientAccumulationOfFourMicroBatchesEqualsOneBatchOfFour()
    {
        var c = TinyLlama.Config(vocab: 50);
        var rng = new Random(3);
        var rows = Enumerable.Range(0, 4).Select(i =>
        {
            int n = 5 + 3 * i; // different lengths: padding and token counts differ per micro-batch
            var ids = Enumerable.Range(0, n).Select(_ => rng.Next(50)).ToArray();
            var labels = ids.Select((t, k) => k < 2 ? -100 : t).ToArray();
            return TokenRow.Single(new EncodedSample(ids, labels, false));
        }).ToList();
        Dictionary<string, TorchSharp.torch.Tensor> Grads(IReadOnlyList<IReadOnlyList<TokenRow>> batches, out double loss)
        {
            using var model = LlamaForCausalLM.CreateRandom(c, 5, computeDType: TorchSharp.torch.ScalarType.Float32);
            model.ApplyLora(new LoraOptions { Rank = 4, Init = "gaussian" }, new TorchSharp.torch.Generator(9));
            foreach (var (_, layer) in model.LoraLayers)
                using (TorchSharp.torch.no_grad()) layer.LoraB("default").normal_(0, 0.1, generator: new TorchSharp.torch.Generator(11));
            model.train();
            var (sum, targets, _) = TrainingRun.Backward(model, batches, padId: 0);
            loss = sum / targets;
            return model.TrainableParameters().ToDictionary(p => p.Name, p => p.Parameter.grad!.detach().clone());
        }
        var accumulated = Grads(rows.Select(r => (IReadOnlyList<TokenRow>)[r]).ToList(), out var lossA);
        var single = Grads([rows], out var lossB);
        Assert.Equal(lossB, lossA, 5);
        foreach (var (name, g) in single)
            Assert.True(g.allclose(accumulated[name], rtol: 1e-4, atol: 1e-6), name);
        // The mean of micro-batch means would differ: the rows have different target counts.
        double meanOfMeans = rows.Select(r => r.ShiftedTargetCount).Distinct().Count();
        Assert.True(meanOfMeans > 1);
    }
}

public class TrainingDivergenceTests
{
    [Fact]
    public void NonFiniteStepsAreSkippedAndTooManyInARowStopWithTheLastGoodCheckpointIntact()
    {
        using var dir = new TempFolder();
        // float16 activations and a learning rate of 0.9 without clipping overflow within a few steps.
        var jobPath = TrainJobFixture.WriteJob(dir.Path, j =>
        {
            j["Model"]!["ComputeDType"] = "float16";
            j["Training"] = new JsonObject { ["MaxSteps"] = 40, ["LearningRate"] = 0.9, ["MaxGradNorm"] = 0, ["MaxConsecutiveBadSteps"] = 2, ["Scheduler"] = "constant", ["Seed"] = 7 };
            j["Output"] = new JsonObject { ["Dir"] = "out", ["SaveEveryNSteps"] = 1, ["KeepLast"] = 2 };
            j["Eval"] = new JsonObject();
        });
        var job = JobConfiguration.LoadTrainJob(jobPath, environment: false);
        var log = new List<string>();
        var e = Assert.Throws<InvalidOperationException>(() => TrainingRun.Run(job, new TrainingRun.RunOptions { Log = log.Add }));
        Assert.Contains("2 consecutive steps had a non-finite loss or gradient", e.Message);
        Assert.Contains(log, l => l.Contains("update skipped", StringComparison.Ordinal));
        var checkpoints = new TrainingCheckpoints(dir.File("out/checkpoints"), 2);
        var latest = checkpoints.Latest();
        Assert.NotNull(latest);
        Assert.Contains(latest, e.Message);
        var state = TrainerState.Load(Path.Combine(latest!, TrainerState.FileName));
        Assert.True(state.History.All(h => !h.Skipped || state.ConsecutiveBadSteps > 0));
    }
}

public class TrainingBudgetTests
{
    [Fact]
    public void AJobOverItsMemoryBudgetIsRefusedBeforeAnythingLoadsOrIsDeleted()
    {
        using var dir = new TempFolder();
        var jobPath = TrainJobFixture.WriteJob(dir.Path, j => j["Memory"] = new JsonObject { ["Budget"] = "1MB" });
        Directory.CreateDirectory(dir.File("out/checkpoints/checkpoint-000001"));
        File.WriteAllText(dir.File("out/adapter_config.json"), "{}");
        var job = JobConfiguration.LoadTrainJob(jobPath, ["--Output:Overwrite", "true"], environment: false);
        var e = Assert.Throws<InvalidOperationException>(() => TrainingRun.Run(job));
        Assert.Contains("over Memory:Budget 1MB", e.Message);
        Assert.Contains("Nothing was loaded", e.Message);
        Assert.True(File.Exists(dir.File("out/adapter_config.json"))); // the previous run is untouched
        Assert.True(Directory.Exists(dir.File("out/checkpoints/checkpoint-000001")));
        var fits = JobConfiguration.LoadTrainJob(jobPath, ["--Memory:Budget", "2GB", "--Output:Overwrite", "true", "--Training:MaxSteps", "1", "--Eval:ExactMatch", "false"], environment: false);
        var log = new List<string>();
        TrainingRun.Run(fits, new TrainingRun.RunOptions { Log = log.Add });
        Assert.Contains(log, l => l.StartsWith("memory plan: peak", StringComparison.Ordinal) && l.Contains("budget", StringComparison.Ordinal));
    }
}
