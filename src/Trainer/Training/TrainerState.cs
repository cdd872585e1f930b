using System.Text.Json;
using System.Text.Json.Serialization;

namespace QLora.Trainer;

/// <summary>One optimizer step's figures.</summary>
public sealed record StepRecord(
    [property: JsonPropertyName("step")] int Step,
    [property: JsonPropertyName("loss")] double Loss,
    [property: JsonPropertyName("lr")] double LearningRate,
    [property: JsonPropertyName("grad_norm")] double GradNorm,
    [property: JsonPropertyName("tokens")] long Tokens,
    [property: JsonPropertyName("skipped")] bool Skipped);

/// <summary>One evaluation's figures.</summary>
public sealed record EvalRecord(
    [property: JsonPropertyName("step")] int Step,
    [property: JsonPropertyName("loss")] double Loss,
    [property: JsonPropertyName("perplexity")] double Perplexity,
    [property: JsonPropertyName("exact_match")] double? ExactMatch)
{
    /// <summary>Multiple-choice accuracy by summed log-likelihood (Eval:ChoicesFile), when measured.</summary>
    [JsonPropertyName("mc_acc")] public double? MultipleChoiceAccuracy { get; init; }
    /// <summary>Multiple-choice accuracy by log-likelihood per character of the choice, when measured.</summary>
    [JsonPropertyName("mc_acc_norm")] public double? MultipleChoiceAccuracyNorm { get; init; }
}

/// <summary>
/// Everything besides weights and optimizer moments that a resumed run needs to continue exactly as the uninterrupted
/// one: the step, the data position, the RNG state, the counters and the history so far (trainer_state.json).
/// </summary>
public sealed class TrainerState
{
    /// <summary>The file name inside a checkpoint.</summary>
    public const string FileName = "trainer_state.json";

    /// <summary>Optimizer steps done.</summary>
    [JsonPropertyName("step")] public int Step { get; set; }
    /// <summary>Epoch of the next micro-batch.</summary>
    [JsonPropertyName("epoch")] public int Epoch { get; set; }
    /// <summary>Index of the next micro-batch within its epoch.</summary>
    [JsonPropertyName("batch_index")] public int BatchIndex { get; set; }
    /// <summary>Steps skipped for a non-finite loss or gradient.</summary>
    [JsonPropertyName("skipped_steps")] public int SkippedSteps { get; set; }
    /// <summary>Skipped steps in a row at the end.</summary>
    [JsonPropertyName("consecutive_bad_steps")] public int ConsecutiveBadSteps { get; set; }
    /// <summary>Non-padding tokens processed.</summary>
    [JsonPropertyName("tokens_seen")] public long TokensSeen { get; set; }
    /// <summary>Training seconds so far (evaluation excluded).</summary>
    [JsonPropertyName("train_seconds")] public double TrainSeconds { get; set; }
    /// <summary>libtorch's CPU generator state (base64).</summary>
    [JsonPropertyName("rng_state")] public string? RngState { get; set; }
    /// <summary>Every rank's generator state (base64), in rank order, in a data-parallel run (absent otherwise).</summary>
    [JsonPropertyName("rank_rng_states"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] public List<string>? RankRngStates { get; set; }
    /// <summary>Exact match of the base model before training, when measured.</summary>
    [JsonPropertyName("exact_match_before")] public double? ExactMatchBefore { get; set; }
    /// <summary>Multiple-choice accuracy (acc, acc_norm) of the model before training, when Eval:ChoicesFile is set.</summary>
    [JsonPropertyName("mc_acc_before")] public double? MultipleChoiceBefore { get; set; }
    /// <summary>acc_norm before training.</summary>
    [JsonPropertyName("mc_acc_norm_before")] public double? MultipleChoiceNormBefore { get; set; }
    /// <summary>Per-step history.</summary>
    [JsonPropertyName("log_history")] public List<StepRecord> History { get; set; } = [];
    /// <summary>Evaluation history.</summary>
    [JsonPropertyName("eval_history")] public List<EvalRecord> EvalHistory { get; set; } = [];

    static readonly JsonSerializerOptions Json = new() { WriteIndented = true, NewLine = "\n", NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals };

    /// <summary>The state as JSON.</summary>
    public string ToJson() => JsonSerializer.Serialize(this, Json);

    /// <summary>Reads a state file; a damaged one is an <see cref="InvalidDataException"/>.</summary>
    public static TrainerState Load(string path)
    {
        try
        {
            return JsonSerializer.Deserialize<TrainerState>(File.ReadAllText(path), Json) ?? throw new InvalidDataException($"{path}: empty");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: not a valid trainer state ({e.Message})", e);
        }
    }
}
