using System.Globalization;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Evaluation of a model during training: mean loss over the eval rows' target tokens (and its perplexity), greedy
/// exact-match accuracy on eval samples that have a reference answer, multiple-choice accuracy by log-likelihood
/// (<see cref="MultipleChoiceScorer"/>), and completions of fixed prompts for the log. <c>qlora train</c> and
/// <c>qlora eval</c> both evaluate through this class. In data-parallel training the rows, samples and items are dealt
/// round-robin to the ranks and the sums gathered, so every rank gets the same figures; the prompts are completed on
/// rank 0 only.
/// </summary>
internal sealed class Evaluation(LlamaForCausalLM model, HfTokenizer tokenizer, SampleEncoder encoder, IReadOnlyList<TokenRow> rows,
    IReadOnlyList<TrainingSample> samples, EvalSection options, int padId, Action<string> log, DataParallel ranks,
    IReadOnlyList<MultipleChoiceItem>? choices = null, bool choicesAsText = false)
{
    /// <summary>The multiple-choice items (none: no multiple-choice evaluation).</summary>
    public IReadOnlyList<MultipleChoiceItem> Choices { get; } = choices ?? [];

    /// <summary>Multiple-choice accuracy (acc and acc_norm) over <see cref="Choices"/>, logged; null without items.</summary>
    public MultipleChoiceResult? MultipleChoice(string when)
    {
        if (Choices.Count == 0) return null;
        var mine = new MultipleChoiceScorer(model, encoder, choicesAsText, options.BatchSize).Score(Mine(Choices));
        Span<double> sums = [mine.Correct, mine.CorrectNorm];
        ranks.Sum(sums, $"multiple choice {when}");
        var all = new MultipleChoiceResult(Choices.Count, (int)sums[0], (int)sums[1]);
        log($"multiple choice {when}: acc {all.Correct}/{all.Items} = {all.Accuracy.ToString("P1", CultureInfo.InvariantCulture)}, " +
            $"acc_norm {all.CorrectNorm}/{all.Items} = {all.AccuracyNorm.ToString("P1", CultureInfo.InvariantCulture)}");
        return all;
    }

    IReadOnlyList<T> Mine<T>(IReadOnlyList<T> all) => ranks.Enabled ? [.. all.Where((_, i) => i % ranks.WorldSize == ranks.Rank)] : all;

    /// <summary>How many samples exact match uses.</summary>
    public static int ExactMatchCount(IReadOnlyList<TrainingSample> samples, EvalSection options)
    {
        int n = samples.Count(s => s.ReferenceAnswer is not null);
        return options.ExactMatchSamples > 0 ? Math.Min(n, options.ExactMatchSamples) : n;
    }

    /// <summary>Eval loss (NaN without eval rows), optionally exact match, and prompt completions, logged.</summary>
    public EvalRecord Evaluate(int step, bool exactMatch, bool multipleChoice = false)
    {
        double loss = Loss();
        double? em = exactMatch ? ExactMatch($"after {step} steps") : null;
        var mc = multipleChoice ? MultipleChoice($"after {step} steps") : null;
        if (!double.IsNaN(loss)) log($"eval at step {step}: loss {loss:F4}, perplexity {Math.Exp(loss):F3}");
        var prompts = ranks.IsRoot ? options.Prompts ?? [] : [];
        var completions = GenerateAll(prompts.Select(p => tokenizer.Encode(p, addSpecialTokens: true)).ToList());
        for (int i = 0; i < prompts.Count; i++)
            log($"eval at step {step}: {prompts[i]} -> {tokenizer.Decode(completions[i]).ReplaceLineEndings("\\n")}");
        return new EvalRecord(step, loss, Math.Exp(loss), em)
        {
            MultipleChoiceAccuracy = mc is null ? null : Math.Round(mc.Accuracy, 6),
            MultipleChoiceAccuracyNorm = mc is null ? null : Math.Round(mc.AccuracyNorm, 6),
        };
    }

    /// <summary>Mean loss per target token over the eval rows.</summary>
    public double Loss()
    {
        if (rows.Count == 0) return double.NaN;
        var use = options.MaxRows > 0 ? rows.Take(options.MaxRows).ToList() : rows;
        bool wasTraining = model.training;
        model.eval();
        double sum = 0;
        long tokens = 0;
        try
        {
            using var noGrad = no_grad();
            foreach (var row in Mine(use))
            {
                using var scope = NewDisposeScope();
                using var batch = MicroBatch.Create([row], padId, model.Device, model.SegmentAttention);
                if (batch.TargetTokens == 0) continue;
                var (s, n) = model.Loss(batch.InputIds, batch.Labels, batch.PositionIds, batch.AttentionMask, batch.Segments);
                sum += s.to(ScalarType.Float64).item<double>();
                tokens += n;
            }
        }
        finally
        {
            model.train(wasTraining);
        }
        Span<double> sums = [sum, tokens];
        ranks.Sum(sums, "the evaluation loss");
        (sum, tokens) = (sums[0], (long)sums[1]);
        return tokens == 0 ? double.NaN : sum / tokens;
    }

    /// <summary>The token ids of this rank's answers in the last <see cref="ExactMatch"/>, in sample order (benchmarks compare them).</summary>
    public IReadOnlyList<IReadOnlyList<int>> LastAnswers { get; private set; } = [];

    /// <summary>Fraction of eval samples whose greedy answer equals the reference (both trimmed).</summary>
    public double? ExactMatch(string when)
    {
        var chosen = samples.Where(s => s.ReferenceAnswer is not null).ToList();
        if (options.ExactMatchSamples > 0) chosen = chosen.Take(options.ExactMatchSamples).ToList();
        if (chosen.Count == 0)
        {
            log("exact match: no eval sample ends with an assistant answer; nothing to measure");
            return null;
        }
        var mine = Mine(chosen);
        var answers = GenerateAll(mine.Select(s => encoder.EncodePrompt(s)).ToList());
        int hits = 0;
        string? example = null;
        LastAnswers = [.. answers];
        for (int i = 0; i < mine.Count; i++)
        {
            var answer = tokenizer.Decode(answers[i]).Trim();
            if (answer == mine[i].ReferenceAnswer!.Trim()) hits++;
            example ??= $"'{answer.ReplaceLineEndings("\\n")}' (expected '{mine[i].ReferenceAnswer!.Trim().ReplaceLineEndings("\\n")}')";
        }
        Span<double> total = [hits];
        ranks.Sum(total, $"exact match {when}");
        hits = (int)total[0];
        double em = (double)hits / chosen.Count;
        log($"exact match {when}: {hits}/{chosen.Count} = {em.ToString("P1", CultureInfo.InvariantCulture)}; first answer {example}");
        return Math.Round(em, 6);
    }

    /// <summary>
    /// Greedy answers to <paramref name="prompts"/>, in their order, decoded <see cref="EvalSection.BatchSize"/> at a time
    /// (prompts of similar length batched together, so little padding is decoded). Generation of a small model runs many
    /// tiny ops per token, where splitting each across threads costs more than it saves (and collapses when the machine is
    /// busy): such models decode on one intra-op thread.
    /// </summary>
    IReadOnlyList<IReadOnlyList<int>> GenerateAll(IReadOnlyList<IReadOnlyList<int>> prompts)
    {
        var answers = new IReadOnlyList<int>[prompts.Count];
        int threads = get_num_threads();
        bool small = model.Config.HiddenSize <= 1024;
        if (small) set_num_threads(1);
        try
        {
            if (options.BatchSize <= 1)
            {
                for (int i = 0; i < prompts.Count; i++) answers[i] = TextGenerator.Generate(model, prompts[i], Greedy());
                return answers;
            }
            var order = Enumerable.Range(0, prompts.Count).OrderBy(i => prompts[i].Count).ToArray();
            foreach (var chunk in order.Chunk(options.BatchSize))
            {
                var outputs = TextGenerator.GenerateBatch(model, [.. chunk.Select(i => prompts[i])], Greedy());
                for (int j = 0; j < chunk.Length; j++) answers[chunk[j]] = outputs[j];
            }
            return answers;
        }
        finally
        {
            if (small) set_num_threads(threads);
        }
    }

    GenerationOptions Greedy() => new()
    {
        MaxNewTokens = options.MaxNewTokens,
        Temperature = 0,
        StopTokenIds = StopIds(),
    };

    IReadOnlyList<int> StopIds()
    {
        var ids = new List<int>(tokenizer.EosTokenIds);
        if (tokenizer.EosTokenId is int eos && !ids.Contains(eos)) ids.Add(eos);
        foreach (var marker in new[] { "<|eot_id|>", "<|im_end|>", "<|end_of_text|>" })
            if (tokenizer.TokenToId(marker) is int id && !ids.Contains(id)) ids.Add(id);
        return ids;
    }
}
