using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary><c>qlora eval</c>'s library recipe and the multiple-choice scorer.</summary>
public class EvalRunTests
{
    static void WriteChoices(string path)
    {
        var lines = new List<string>();
        var rng = new Random(5);
        for (int i = 0; i < 6; i++)
        {
            int a = rng.Next(10), b = rng.Next(10), answer = rng.Next(3);
            var choices = new JsonArray();
            for (int k = 0; k < 3; k++) choices.Add(k == answer ? $"{a + b}" : $"{a + b + k + 1}");
            lines.Add(new JsonObject { ["question"] = $"add\n\n{a} {b}", ["choices"] = choices, ["answer"] = answer }.ToJsonString());
        }
        File.WriteAllLines(path, lines);
    }

    [Fact]
    public void EvalLossAndMultipleChoiceEqualTheTrainingLoopsOwnEvaluationOfTheSameAdapter()
    {
        using var dir = new TempFolder();
        WriteChoices(dir.File("choices.jsonl"));
        var jobPath = TrainJobFixture.WriteJob(dir.Path, j =>
        {
            j["Training"]!["MaxSteps"] = 3;
            j["Eval"] = new JsonObject { ["ExactMatch"] = false, ["ChoicesFile"] = "choices.jsonl", ["BatchSize"] = 4 };
            j["Output"]!["SaveEveryNSteps"] = 0;
        });
        var job = JobConfiguration.LoadTrainJob(jobPath, environment: false);
        var trained = TrainingRun.Run(job, new TrainingRun.RunOptions());
        double trainEval = trained.State.EvalHistory.Last().Loss;
        Assert.NotNull(trained.Summary.MultipleChoiceBefore);
        Assert.Equal(6, trained.Summary.MultipleChoiceItems);

        var evalJob = JobConfiguration.LoadTrainJob(jobPath, environment: false);
        var log = new List<string>();
        var report = EvalRun.Run(evalJob, new EvalRun.Options { Data = dir.File("eval.jsonl"), Adapter = dir.File("out"), Log = log.Add });
        Assert.Equal(trainEval, report.EvalLoss);
        Assert.Equal(Math.Round(Math.Exp(trainEval), 4), report.EvalPerplexity);
        Assert.Equal(8, report.EvalSamples);
        Assert.NotNull(report.ExactMatch); // the samples end with answers, so exact match is measured

        var mc = EvalRun.Run(evalJob, new EvalRun.Options { Data = dir.File("choices.jsonl"), Adapter = dir.File("out") });
        Assert.Null(mc.EvalLoss);
        Assert.Equal(6, mc.MultipleChoiceItems);
        Assert.Equal(trained.Summary.MultipleChoiceAfter, mc.MultipleChoiceAccuracy);
        Assert.Equal(trained.Summary.MultipleChoiceNormAfter, mc.MultipleChoiceAccuracyNorm);

        // Without the adapter the figure is the base's, which the training changed.
        var baseOnly = EvalRun.Run(evalJob, new EvalRun.Options { Data = dir.File("eval.jsonl") });
        Assert.NotEqual(trainEval, baseOnly.EvalLoss);
        Assert.Contains("{\"model\":", report.ToJsonLine());
    }

    [Fact]
    public void ChoiceLogLikelihoodsEqualAFloat64ComputationAndDecideAccAndAccNorm()
    {
        using var scope = NewDisposeScope();
        using var dir = new TempFolder();
        var c = TinyLlama.Config(vocab: TrainJobFixture.Vocab);
        var weights = HfModelLoaderTests.WriteFolder(dir.File("model"), c);
        var tok = TokenizerFixtures.WriteByteLevelFolder();
        foreach (var f in Directory.GetFiles(tok)) File.Copy(f, Path.Combine(dir.File("model"), Path.GetFileName(f)), overwrite: true);
        Directory.Delete(tok, recursive: true);
        using var tokenizer = HfTokenizer.Load(dir.File("model"));
        using var model = HfModelLoader.Load(dir.File("model"), new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        var encoder = new SampleEncoder(tokenizer, tokenizer.GetChatTemplate(), 512);
        MultipleChoiceItem[] items =
        [
            new("pick one", ["a", "bb", "ccc"], 2),
            new("which?", ["yes", "no"], 0),
            new("longer question here", ["x", "yz", "12", "longest choice"], 1),
        ];
        var scorer = new MultipleChoiceScorer(model, encoder, plainText: false, batchSize: 3); // batches mix items and lengths
        var encoded = items.Select(scorer.Encode).ToList();
        var requests = encoded.SelectMany(e => e.Continuations.Select(k => (e.Context, k))).ToList();
        var lls = scorer.LogLikelihoods(requests);

        int correct = 0, correctNorm = 0, r = 0;
        foreach (var (item, (context, continuations)) in items.Zip(encoded))
        {
            // The context is the chat template's prompt; each continuation is exactly the choice's bytes.
            Assert.Equal(tokenizer.Encode(encoder.Template.Render([ChatMessage.User(item.Question)], addGenerationPrompt: true), addSpecialTokens: false), context);
            var reference = new double[item.Choices.Count];
            for (int k = 0; k < item.Choices.Count; k++)
            {
                Assert.Equal(item.Choices[k], tokenizer.Decode(continuations[k]));
                long[] full = [.. context.Select(x => (long)x), .. continuations[k].Select(x => (long)x)];
                var logits = LlamaModelTests.ReferenceLogits(c, n => weights[n], full[..^1]);
                var logp = logits.log_softmax(-1);
                for (int j = 0; j < continuations[k].Length; j++)
                    reference[k] += logp[context.Length - 1 + j, continuations[k][j]].item<double>();
                Assert.True(Math.Abs(lls[r] - reference[k]) < 1e-4, $"choice '{item.Choices[k]}': {lls[r]} vs float64 {reference[k]}");
                r++;
            }
            if (Array.IndexOf(reference, reference.Max()) == item.Answer) correct++;
            var perChar = reference.Select((x, k) => x / item.Choices[k].Length).ToArray();
            if (Array.IndexOf(perChar, perChar.Max()) == item.Answer) correctNorm++;
        }
        var result = scorer.Score(items);
        Assert.Equal(new MultipleChoiceResult(3, correct, correctNorm), result);
        // One at a time gives the same sums as the mixed batch (padding never reaches a real position).
        var single = new MultipleChoiceScorer(model, encoder, plainText: false, batchSize: 1).LogLikelihoods(requests);
        for (int i = 0; i < lls.Length; i++) Assert.True(Math.Abs(lls[i] - single[i]) < 1e-5);
    }

    [Fact]
    public void MalformedMultipleChoiceLinesAreOneErrorNamingTheLine()
    {
        using var dir = new TempFolder();
        File.WriteAllLines(dir.File("mc.jsonl"), ["{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 1}", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 2}"]);
        var e = Assert.Throws<DataFormatException>(() => MultipleChoiceItem.Read(dir.File("mc.jsonl")));
        Assert.Contains("mc.jsonl:2:", e.Message);
        Assert.Contains("\"answer\"", e.Message);
        File.WriteAllLines(dir.File("mixed.jsonl"), ["{\"instruction\": \"add\", \"input\": \"1 2\", \"output\": \"3\"}", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}"]);
        var (samples, items) = EvalDataset.Read(dir.File("mixed.jsonl"), null);
        Assert.Single(samples);
        Assert.Single(items);
        Assert.Throws<DataFormatException>(() => MultipleChoiceItem.Read(dir.File("mixed.jsonl")));
    }
}

public class QualityBenchmarkTests
{
    [Fact]
    public void EachVariantTrainsTheJobAsItIsWithOnlyItsBaseOutputAndEvaluationsChanged()
    {
        var job = new TrainJob
        {
            Model = { Path = "m", ComputeDType = "bfloat16" }, Data = { TrainFile = "t.jsonl", EvalFile = "e.jsonl" },
            Training = { Seed = 11, MaxSteps = 300, LearningRate = 0.002 }, Eval = { EveryNSteps = 100, ExactMatch = true, ChoicesFile = "c.jsonl" },
            Output = { Dir = "out/q", SaveEveryNSteps = 100 },
        };
        var fp4 = QualityBenchmark.JobFor(job, QualityBenchmark.Variants.Single(v => v.Name == "fp4"), "out/bench/fp4");
        Assert.Equal(("fp4", false), (fp4.Quantization.QuantType, fp4.Quantization.DoubleQuant));
        Assert.Equal((11, 300, 0.002), (fp4.Training.Seed, fp4.Training.MaxSteps, fp4.Training.LearningRate));
        Assert.Equal("out/bench/fp4", fp4.Output.Dir);
        Assert.Equal((0, false, (string?)null), (fp4.Eval.EveryNSteps, fp4.Eval.ExactMatch, fp4.Eval.ChoicesFile));
        Assert.Equal("nf4", job.Quantization.QuantType); // the job itself is left as it was
        Assert.False(QualityBenchmark.JobFor(job, QualityBenchmark.Variants[0], "x").Quantization.QuantizesBase);
        Assert.Equal(["bf16", "nf4+dq", "nf4", "fp4+dq", "fp4"], QualityBenchmark.Variants.Select(v => v.Name));
    }

    [Fact]
    public void TheTargetsCompareNf4DqWithTheSixteenBitBase()
    {
        static QualityBenchmark.Row Row(string name, double loss, double em) => new(QualityBenchmark.Variants.Single(v => v.Name == name),
            new EvalRun.Report(), null, new EvalRun.Report { EvalLoss = loss, ExactMatch = em }, null, new TrainSummary(), 1);
        var met = QualityBenchmark.Targets([Row("bf16", 0.100, 0.98), Row("nf4+dq", 0.1015, 0.97)])!.Value;
        Assert.Equal(0.015, met.LossRatio, 9);
        Assert.Equal(-1.0, met.ExactMatchPoints, 9);
        Assert.True(met.Met);
        Assert.False(QualityBenchmark.Targets([Row("bf16", 0.100, 0.98), Row("nf4+dq", 0.103, 0.98)])!.Value.Met);
        Assert.False(QualityBenchmark.Targets([Row("bf16", 0.100, 0.98), Row("nf4+dq", 0.100, 0.95)])!.Value.Met);
        Assert.Null(QualityBenchmark.Targets([Row("nf4", 0.1, 0.9)]));
    }

    [Fact]
    public void WithSeveralSeedsTheTargetsAreTheMediansOfThePerSeedDifferences()
    {
        static QualityBenchmark.Row Row(string name, int seed, double loss, double em, double? mc = null) => new(QualityBenchmark.Variants.Single(v => v.Name == name),
            new EvalRun.Report(), null, new EvalRun.Report { EvalLoss = loss, ExactMatch = em }, mc is null ? null : new EvalRun.Report { MultipleChoiceAccuracy = mc },
            new TrainSummary(), 1, seed);
        // Per seed: +10 %, +1 %, -1 % (loss) and -3, +1, 0 points (exact match); medians +1 % and 0 points: met, although
        // seed 1 alone is not. Pairs are matched by seed, not by order.
        QualityBenchmark.Row[] rows =
        [
            Row("bf16", 1, 0.100, 0.95, 0.99), Row("bf16", 2, 0.200, 0.90, 1.00), Row("bf16", 3, 0.100, 0.97, 0.98),
            Row("nf4+dq", 3, 0.099, 0.97, 0.97), Row("nf4+dq", 1, 0.110, 0.92, 1.00), Row("nf4+dq", 2, 0.202, 0.91, 0.99),
        ];
        var t = QualityBenchmark.Targets(rows)!.Value;
        Assert.Equal(0.01, t.LossRatio, 9);
        Assert.Equal(0.0, t.ExactMatchPoints, 9);
        Assert.True(t.Met);
        Assert.False(QualityBenchmark.Targets(rows.Where(r => r.Seed == 1).ToList())!.Value.Met);

        var summary = QualityBenchmark.SeedSummary(rows).ToList();
        Assert.Equal(4, summary.Count); // header, rule, bf16, nf4+dq
        Assert.Equal("| bf16 | 3 | 0.1000 (0.1000–0.2000) | 95 (90–97) | 99 (98–100) |", summary[2]);
        Assert.Equal("| nf4+dq | 3 | 0.1100 (0.0990–0.2020) | 92 (91–97) | 99 (97–100) |", summary[3]);
        Assert.Empty(QualityBenchmark.SeedSummary(rows.Where(r => r.Seed == 2).ToList()));
        Assert.Contains(" seed |", QualityBenchmark.Table(rows).First());
    }

    [Fact]
    public void TheLossTargetIsDecidedByTheIntervalOfTheGeometricMeanRatio()
    {
        static QualityBenchmark.Row Row(string name, int seed, double loss) => new(QualityBenchmark.Variants.Single(v => v.Name == name),
            new EvalRun.Report(), null, new EvalRun.Report { EvalLoss = loss }, null, new TrainSummary(), 1, seed);
        // Ratios e^0.1, e^0.2, e^0.3 (seed order shuffled): log mean 0.2, SD 0.1, t(2) = 4.303, half-width
        // 4.303 · 0.1 / √3 = 0.248434; by hand: e^0.2 − 1 = 0.221403, e^-0.048434 − 1 = −0.047280, e^0.448434 − 1 = 0.565858.
        QualityBenchmark.Row[] rows =
        [
            Row("bf16", 7, 1.0), Row("nf4+dq", 9, Math.Exp(0.3)), Row("bf16", 9, 1.0), Row("nf4+dq", 7, Math.Exp(0.1)),
            Row("bf16", 8, 2.0), Row("nf4+dq", 8, 2.0 * Math.Exp(0.2)), Row("nf4", 8, 5.0),
        ];
        var c = QualityBenchmark.CompareLoss(rows)!;
        Assert.Equal(3, c.Seeds);
        Assert.Equal(0.221403, c.Change, 5);
        Assert.Equal(-0.047280, c.Low, 5);
        Assert.Equal(0.565858, c.High, 5);
        Assert.Equal("undecided", c.Verdict); // the interval holds both 0 and +2 %
        Assert.Equal("met", QualityBenchmark.LossComparison.Of([1.01, 0.99, 1.0, 1.005, 0.995]).Verdict); // ±1.3 %
        Assert.Equal("missed", QualityBenchmark.LossComparison.Of([1.10, 1.12, 1.11]).Verdict);
        Assert.Equal("missed", QualityBenchmark.LossComparison.Of([0.90, 0.88, 0.89]).Verdict); // lower counts too: "within 2 %"
        Assert.Null(QualityBenchmark.CompareLoss(rows.Where(r => r.Seed == 7).ToList())); // one seed: no interval
    }

    [Fact]
    public void StudentsTQuantilesAreTheTabulatedOnesAndApproachTheNormal()
    {
        Assert.Equal(12.706, BenchStatistics.StudentT975(1));
        Assert.Equal(2.262, BenchStatistics.StudentT975(9));
        Assert.Equal(2.042, BenchStatistics.StudentT975(30));
        Assert.Equal(2.021, BenchStatistics.StudentT975(40), 3); // table: 2.021
        Assert.Equal(1.984, BenchStatistics.StudentT975(100), 3); // table: 1.984
        var (mean, low, high) = BenchStatistics.MeanInterval95([1.0, 2.0, 3.0]); // SD 1: 2 ± 4.303/√3
        Assert.Equal((2.0, 2 - 4.303 / Math.Sqrt(3), 2 + 4.303 / Math.Sqrt(3)), (mean, low, high));
        Assert.Throws<ArgumentException>(() => BenchStatistics.MeanInterval95([1.0]));
    }

    [Fact]
    public void TheMedianIsTheMiddleValueOrTheMeanOfTheMiddleTwo()
    {
        Assert.Equal(3.0, BenchStatistics.Median([5.0, 1.0, 3.0]));
        Assert.Equal(2.5, BenchStatistics.Median([4.0, 1.0, 2.0, 3.0]));
        Assert.Equal(-7.0, BenchStatistics.Median([-7.0]));
        Assert.Throws<ArgumentException>(() => BenchStatistics.Median([]));
    }
}
