namespace QLora.Trainer;

/// <summary>
/// The predicted memory of one training job: device memory by component at the peak moment of a step, the host memory
/// it needs besides (paged optimizer state, streamed weights), whether the peak fits the budget and, if not, changes
/// of settings that were re-planned and do fit.
/// </summary>
public sealed record MemoryPlan
{
    /// <summary>The architecture planned for.</summary>
    public required LlamaConfig Config { get; init; }
    /// <summary>The settings planned with.</summary>
    public required PlanOptions Options { get; init; }
    /// <summary>Device memory by component, at the peak moment; they sum to <see cref="PeakBytes"/>.</summary>
    public required IReadOnlyList<MemoryComponent> Components { get; init; }
    /// <summary>The largest device memory of a step.</summary>
    public required long PeakBytes { get; init; }
    /// <summary>When in the step the peak happens (e.g. "backward: recompute of layer 31").</summary>
    public required string PeakPhase { get; init; }
    /// <summary>Host memory the job needs besides: paged optimizer state, streamed 4-bit weights.</summary>
    public required IReadOnlyList<MemoryComponent> HostComponents { get; init; }
    /// <summary>Trainable (LoRA) parameters.</summary>
    public required long TrainableParameters { get; init; }
    /// <summary>Settings changes that make the job fit, each re-planned (empty when it fits or nothing tried fits).</summary>
    public IReadOnlyList<PlanSuggestion> Suggestions { get; init; } = [];

    /// <summary>The budget, or null.</summary>
    public long? BudgetBytes => Options.BudgetBytes;
    /// <summary>True when there is no budget or the peak is within it.</summary>
    public bool Fits => BudgetBytes is not long b || PeakBytes <= b;
    /// <summary>Host bytes in all.</summary>
    public long HostBytes => HostComponents.Sum(c => c.Bytes);
    /// <summary>A component's bytes by name (0 when absent).</summary>
    public long this[string name] => Components.FirstOrDefault(c => c.Name == name)?.Bytes ?? 0;

    /// <summary>The peak without the fixed framework overhead: what the model and the step add.</summary>
    public long PeakAboveFrameworkBytes => PeakBytes - this["framework_overhead"];

    /// <summary>The plan as a readable table: components with bytes and what they are, host memory, peak, verdict, suggestions.</summary>
    public string ToTable()
    {
        var sb = new System.Text.StringBuilder();
        int w = Math.Max(24, Components.Concat(HostComponents).Max(c => c.Name.Length));
        sb.AppendLine($"{"device memory at the peak".PadRight(w)}  {"bytes",15}  {"",10}  what");
        foreach (var c in Components)
            sb.AppendLine($"{c.Name.PadRight(w)}  {c.Bytes,15:N0}  {ByteSize.Format(c.Bytes),10}  {c.Description}");
        sb.AppendLine($"{"peak".PadRight(w)}  {PeakBytes,15:N0}  {ByteSize.Format(PeakBytes),10}  during {PeakPhase}");
        foreach (var c in HostComponents)
            sb.AppendLine($"{("host: " + c.Name).PadRight(w)}  {c.Bytes,15:N0}  {ByteSize.Format(c.Bytes),10}  {c.Description}");
        if (BudgetBytes is long b)
            sb.AppendLine(Fits ? $"fits the budget of {ByteSize.Format(b)} ({b:N0} bytes) with {ByteSize.Format(b - PeakBytes)} to spare"
                : $"does NOT fit the budget of {ByteSize.Format(b)} ({b:N0} bytes): {ByteSize.Format(PeakBytes - b)} over");
        if (!Fits)
        {
            if (Suggestions.Count == 0) sb.AppendLine("no change tried makes it fit (checkpointing, offloaded checkpoints, tiled MLP, paged 8-bit optimizer, loss chunk, micro-batch, sequence length, layer streaming)");
            foreach (var s in Suggestions) sb.AppendLine($"  would fit with {s.Change}: peak {ByteSize.Format(s.PeakBytes)}");
        }
        return sb.ToString().TrimEnd();
    }
}
