namespace QLora.Trainer;

/// <summary>
/// The learning-rate multiplier of optimizer step k (0-based) as transformers' schedulers compute it: linear warmup
/// k/warmup, then cosine (½(1+cos πp)) or linear (1−p) decay over p = (k−warmup)/(total−warmup), or constant; floored at
/// <c>minRatio</c> of the peak (the decay runs from 1 to minRatio).
/// </summary>
public sealed record LearningRateSchedule(string Kind, int WarmupSteps, int TotalSteps, double MinRatio = 0)
{
    /// <summary>The multiplier of step <paramref name="k"/>.</summary>
    public double Factor(int k)
    {
        if (k < WarmupSteps) return (double)k / Math.Max(1, WarmupSteps);
        double p = Math.Clamp((double)(k - WarmupSteps) / Math.Max(1, TotalSteps - WarmupSteps), 0, 1);
        double decay = Kind.ToLowerInvariant() switch
        {
            "cosine" => 0.5 * (1 + Math.Cos(Math.PI * p)),
            "linear" => 1 - p,
            "constant" => 1,
            _ => throw new ArgumentException($"unknown scheduler '{Kind}'; allowed: cosine, linear, constant"),
        };
        return MinRatio + (1 - MinRatio) * decay;
    }
}
