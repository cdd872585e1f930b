namespace QLora.Trainer;

/// <summary>
/// Hyperparameters of <see cref="BnbAdamW"/>: bitsandbytes' AdamW with 32-bit or 8-bit blockwise state, optionally paged.
/// QLoRA's reference recipe is paged 32-bit AdamW, lr 2e-4, no weight decay.
/// </summary>
public sealed record AdamWOptions
{
    /// <summary>Learning rate of groups that do not set their own.</summary>
    public double LearningRate { get; init; } = 2e-4;
    /// <summary>First-moment decay.</summary>
    public double Beta1 { get; init; } = 0.9;
    /// <summary>Second-moment decay.</summary>
    public double Beta2 { get; init; } = 0.999;
    /// <summary>Added to the bias-corrected root of the second moment.</summary>
    public double Epsilon { get; init; } = 1e-8;
    /// <summary>Decoupled weight decay, applied after the update: p *= 1 − lr·wd.</summary>
    public double WeightDecay { get; init; }
    /// <summary>32 (float32 moments) or 8 (blockwise-quantized moments, 256 per block).</summary>
    public int StateBits { get; init; } = 32;
    /// <summary>Keep the state in host memory and bring one tensor's state into device memory for its update.</summary>
    public bool Paged { get; init; }
    /// <summary>Tensors with fewer elements than this keep float32 state even with 8-bit state (bitsandbytes: 4096).</summary>
    public int MinEightBitSize { get; init; } = 4096;

    /// <summary>Checks every value; throws <see cref="ArgumentException"/> naming the bad one and what is allowed.</summary>
    public void Validate()
    {
        if (!(LearningRate >= 0) || double.IsInfinity(LearningRate)) throw new ArgumentException($"LearningRate {LearningRate}: must be a finite number >= 0");
        if (!(Beta1 >= 0 && Beta1 < 1)) throw new ArgumentException($"Beta1 {Beta1}: must be in [0, 1)");
        if (!(Beta2 >= 0 && Beta2 < 1)) throw new ArgumentException($"Beta2 {Beta2}: must be in [0, 1)");
        if (!(Epsilon > 0)) throw new ArgumentException($"Epsilon {Epsilon}: must be > 0");
        if (!(WeightDecay >= 0)) throw new ArgumentException($"WeightDecay {WeightDecay}: must be >= 0");
        if (StateBits is not (32 or 8)) throw new ArgumentException($"StateBits {StateBits}: must be 32 or 8");
        if (MinEightBitSize < 0) throw new ArgumentException($"MinEightBitSize {MinEightBitSize}: must be >= 0");
    }
}
