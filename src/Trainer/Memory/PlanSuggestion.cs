namespace QLora.Trainer;

/// <summary>A change of settings that makes a job fit its budget, with the peak it was re-planned to.</summary>
/// <param name="Change">The change in words (e.g. "micro-batch 1 instead of 4").</param>
/// <param name="Options">The changed settings.</param>
/// <param name="PeakBytes">The planned peak with the change.</param>
public sealed record PlanSuggestion(string Change, PlanOptions Options, long PeakBytes);
