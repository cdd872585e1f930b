namespace QLora.Trainer;

/// <summary>The settings of a weighted adapter merge, as PEFT's <c>add_weighted_adapter</c> takes them.</summary>
public sealed record AdapterMergeOptions
{
    /// <summary>How the adapters are combined (PEFT's default is <c>svd</c>).</summary>
    public AdapterCombination Combination { get; init; } = AdapterCombination.Svd;
    /// <summary>One weight per adapter, in order; negative weights subtract.</summary>
    public IReadOnlyList<double> Weights { get; init; } = [];
    /// <summary>The fraction of values kept by the pruning kinds (ties, dare_*, magnitude_prune), in (0, 1]; null for the others.</summary>
    public double? Density { get; init; }
    /// <summary>TIES's sign election (ties, dare_ties and their svd kinds); null means <see cref="MajoritySignMethod.Total"/>.</summary>
    public MajoritySignMethod? MajoritySign { get; init; }
    /// <summary>The rank of an SVD kind's result; null means the largest rank among the adapters (PEFT's default).</summary>
    public int? SvdRank { get; init; }
    /// <summary>An SVD kind's clamp: its factors are limited to ±this quantile of their values; null for none.</summary>
    public double? SvdClamp { get; init; }
    /// <summary>The seed of DARE's random pruning (<see cref="SplitMix64"/>).</summary>
    public ulong Seed { get; init; } = 42;

    /// <summary>
    /// Refuses (<see cref="ArgumentException"/>, naming the option as the command line spells it) settings that do not
    /// fit <paramref name="adapters"/> adapters or the combination: a weight count that differs, a non-finite weight, a
    /// density outside (0, 1] or missing where the combination prunes, and options the combination would ignore.
    /// </summary>
    public void Validate(int adapters)
    {
        if (adapters < 1) throw new ArgumentException("no adapters to merge: give at least one --adapter");
        if (Weights.Count != adapters)
            throw new ArgumentException($"--weights has {Weights.Count} value{(Weights.Count == 1 ? "" : "s")} for {adapters} adapter{(adapters == 1 ? "" : "s")}: give one weight per --adapter, in the same order");
        foreach (var w in Weights)
            if (!double.IsFinite(w)) throw new ArgumentException($"--weights: {w} is not a finite number");
        var name = Combination.Name();
        bool prunes = Combination.Method() is TaskMergeMethod.Ties or TaskMergeMethod.DareLinear or TaskMergeMethod.DareTies or TaskMergeMethod.MagnitudePrune;
        if (prunes && Density is null)
            throw new ArgumentException($"--combination {name} prunes each adapter to a fraction of its values: give --density in (0, 1] (e.g. 0.5)");
        if (Density is { } d && !(d > 0 && d <= 1))
            throw new ArgumentException($"--density {d}: must be in (0, 1] (the fraction of values each adapter keeps; 1 prunes nothing)");
        if (!prunes && Density is not null)
            throw new ArgumentException($"--density applies to ties, dare_linear, dare_ties, magnitude_prune and their _svd kinds; --combination {name} does not prune");
        bool elects = Combination.Method() is TaskMergeMethod.Ties or TaskMergeMethod.DareTies;
        if (!elects && MajoritySign is not null)
            throw new ArgumentException($"--majority-sign-method applies to ties, dare_ties and their _svd kinds; --combination {name} elects no sign");
        if (!Combination.IsSvd() && (SvdRank is not null || SvdClamp is not null))
            throw new ArgumentException($"--svd-rank and --svd-clamp apply to svd and the _svd kinds; --combination {name} does not factor by SVD");
        if (SvdRank is { } r && r < 1) throw new ArgumentException($"--svd-rank {r}: must be >= 1");
        if (SvdClamp is { } c && !(c >= 0 && c <= 1)) throw new ArgumentException($"--svd-clamp {c}: must be a quantile in [0, 1] (e.g. 0.99)");
    }
}
