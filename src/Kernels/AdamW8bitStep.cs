namespace QLora.Kernels;

/// <summary>
/// The per-step scalars of the 8-bit blockwise AdamW update, computed once on the host in float32 so the kernel and
/// the CPU reference use the very same values: <c>step = −lr·sqrt(1−β2^t)/(1−β1^t)</c>, <c>epsTerm = sqrt(1−β2^t)·eps</c>,
/// <c>decay = 1 − lr·wd</c>.
/// </summary>
public readonly record struct AdamW8bitStep
{
    /// <summary>Elements per quantization block of both states (bitsandbytes ≥ 0.44).</summary>
    public const int Blocksize = 256;

    /// <summary>β1.</summary>
    public required float Beta1 { get; init; }
    /// <summary>β2.</summary>
    public required float Beta2 { get; init; }
    /// <summary>1 − β1, rounded once.</summary>
    public required float OneMinusBeta1 { get; init; }
    /// <summary>1 − β2, rounded once.</summary>
    public required float OneMinusBeta2 { get; init; }
    /// <summary>−lr·sqrt(1−β2^t)/(1−β1^t).</summary>
    public required float StepSize { get; init; }
    /// <summary>sqrt(1−β2^t)·eps, added to sqrt(s2).</summary>
    public required float EpsilonTerm { get; init; }
    /// <summary>1 − lr·weightDecay: the decoupled decay factor applied after the update.</summary>
    public required float DecayFactor { get; init; }

    /// <summary>The scalars for step <paramref name="step"/> (1-based) of AdamW with these hyperparameters.</summary>
    public static AdamW8bitStep Create(float lr, float beta1, float beta2, float eps, float weightDecay, int step)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(step, 1);
        float correction1 = 1f - MathF.Pow(beta1, step);
        float correction2 = MathF.Sqrt(1f - MathF.Pow(beta2, step));
        return new AdamW8bitStep
        {
            Beta1 = beta1,
            Beta2 = beta2,
            OneMinusBeta1 = 1f - beta1,
            OneMinusBeta2 = 1f - beta2,
            StepSize = -lr * correction2 / correction1,
            EpsilonTerm = correction2 * eps,
            DecayFactor = 1f - lr * weightDecay,
        };
    }
}
