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
