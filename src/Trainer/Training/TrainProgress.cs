namespace QLora.Trainer;

/// <summary>What a progress display shows after each optimizer step.</summary>
/// <param name="Step">Steps done.</param>
/// <param name="TotalSteps">Steps the job will run.</param>
/// <param name="Loss">This step's loss (mean over its target tokens).</param>
/// <param name="LearningRate">The peak-group learning rate used for the step.</param>
/// <param name="TokensPerSecond">Training throughput so far (non-padding tokens).</param>
/// <param name="Elapsed">Training time so far.</param>
/// <param name="Remaining">Estimated time to the last step.</param>
/// <param name="MemoryBytes">Resident anonymous memory now.</param>
public sealed record TrainProgress(int Step, int TotalSteps, double Loss, double LearningRate, double TokensPerSecond,
    TimeSpan Elapsed, TimeSpan Remaining, long MemoryBytes);
