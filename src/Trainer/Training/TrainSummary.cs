using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace QLora.Trainer;

/// <summary>The figures of a finished (or interrupted) run: run_summary.json, and the last line <c>qlora train</c> prints.</summary>
public sealed record TrainSummary
{
    /// <summary>Optimizer steps done.</summary>
    [JsonPropertyName("steps")] public int Steps { get; init; }
    /// <summary>Mean loss of the last (up to) 10 steps.</summary>
    [JsonPropertyName("train_loss")] public double? TrainLoss { get; init; }
    /// <summary>Final eval loss (null without an eval set).</summary>
    [JsonPropertyName("eval_loss")] public double? EvalLoss { get; init; }
    /// <summary>exp(eval loss).</summary>
    [JsonPropertyName("eval_perplexity")] public double? EvalPerplexity { get; init; }
    /// <summary>Non-padding training tokens per second of training time.</summary>
    [JsonPropertyName("tokens_per_s")] public double TokensPerSecond { get; init; }
    /// <summary>Peak resident anonymous memory of the process (sampled).</summary>
    [JsonPropertyName("peak_memory_bytes")] public long PeakMemoryBytes { get; init; }
    /// <summary>The phase of the run in which the peak was sampled ("load", "step 3", "final eval", ...).</summary>
    [JsonPropertyName("peak_memory_phase")] public string? PeakMemoryPhase { get; init; }
    /// <summary>Wall time of the whole job, loading included.</summary>
    [JsonPropertyName("wall_s")] public double WallSeconds { get; init; }
    /// <summary>The run's folder.</summary>
    [JsonPropertyName("output_dir")] public string OutputDir { get; init; } = "";
    /// <summary>Greedy exact-match accuracy on the eval samples before training.</summary>
    [JsonPropertyName("exact_match_before")] public double? ExactMatchBefore { get; init; }
    /// <summary>The same after training.</summary>
    [JsonPropertyName("exact_match_after")] public double? ExactMatchAfter { get; init; }
    /// <summary>Eval samples exact match was measured on.</summary>
    [JsonPropertyName("exact_match_samples")] public int? ExactMatchSamples { get; init; }
    /// <summary>Multiple-choice accuracy (Eval:ChoicesFile, by summed log-likelihood) before training.</summary>
    [JsonPropertyName("mc_acc_before")] public double? MultipleChoiceBefore { get; init; }
    /// <summary>The same after training.</summary>
    [JsonPropertyName("mc_acc_after")] public double? MultipleChoiceAfter { get; init; }
    /// <summary>Length-normalised multiple-choice accuracy (log-likelihood per character of the choice) before training.</summary>
    [JsonPropertyName("mc_acc_norm_before")] public double? MultipleChoiceNormBefore { get; init; }
    /// <summary>The same after training.</summary>
    [JsonPropertyName("mc_acc_norm_after")] public double? MultipleChoiceNormAfter { get; init; }
    /// <summary>Multiple-choice items scored.</summary>
    [JsonPropertyName("mc_items")] public int? MultipleChoiceItems { get; init; }
    /// <summary>Steps skipped for a non-finite loss or gradient.</summary>
    [JsonPropertyName("skipped_steps")] public int SkippedSteps { get; init; }
    /// <summary>Samples cut to the maximum sequence length.</summary>
    [JsonPropertyName("truncated_samples")] public int TruncatedSamples { get; init; }
    /// <summary>Malformed dataset lines skipped.</summary>
    [JsonPropertyName("skipped_lines")] public int SkippedLines { get; init; }
    /// <summary>Training tokens processed.</summary>
    [JsonPropertyName("tokens")] public long Tokens { get; init; }
    /// <summary>Whether the run stopped early (Ctrl-C) with a checkpoint to resume from.</summary>
    [JsonPropertyName("interrupted")] public bool Interrupted { get; init; }
    /// <summary>The step the run resumed from (null for a fresh run).</summary>
    [JsonPropertyName("resumed_from_step")] public int? ResumedFromStep { get; init; }
    /// <summary>The last checkpoint written.</summary>
    [JsonPropertyName("checkpoint")] public string? Checkpoint { get; init; }
    /// <summary>The resolved job.</summary>
    [JsonPropertyName("config")] public JsonNode? Config { get; init; }

    /// <summary>The summary as one JSON line (config left out: it is in job.json and run_summary.json).</summary>
    public string ToJsonLine() => JsonSerializer.Serialize(this with { Config = null }, Line);

    /// <summary>The summary as an indented document.</summary>
    public string ToJson() => JsonSerializer.Serialize(this, Indented);

    static readonly JsonSerializerOptions Line = new() { DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };
    static readonly JsonSerializerOptions Indented = new() { WriteIndented = true, NewLine = "\n" };
}
