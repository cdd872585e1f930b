namespace QLora.Trainer;

/// <summary>
/// How <c>qlora merge-adapters</c> combines LoRA adapters into one: PEFT's <c>combination_type</c> of
/// <c>add_weighted_adapter</c>. The plain kinds work on the A and B matrices (same rank needed) or concatenate them; the
/// <c>svd</c> kinds combine the full deltas <c>scaling·B·A</c> and factor the result back to a rank.
/// </summary>
public enum AdapterCombination
{
    /// <summary>Weighted sum of the A matrices and of the B matrices (task arithmetic; PEFT's <c>linear</c>).</summary>
    Linear,
    /// <summary>A and B stacked along the rank: the exact weighted sum of the deltas, at the sum of the ranks.</summary>
    Cat,
    /// <summary>Weighted sum of the deltas, truncated to a rank by SVD.</summary>
    Svd,
    /// <summary>TIES on the A and B matrices: magnitude pruning, sign election, disjoint mean.</summary>
    Ties,
    /// <summary>TIES on the deltas, then SVD.</summary>
    TiesSvd,
    /// <summary>DARE on the A and B matrices: random pruning with rescale, then a weighted sum.</summary>
    DareLinear,
    /// <summary>DARE on the deltas, then SVD.</summary>
    DareLinearSvd,
    /// <summary>DARE pruning, then TIES sign election and disjoint mean, on the A and B matrices.</summary>
    DareTies,
    /// <summary>DARE-TIES on the deltas, then SVD.</summary>
    DareTiesSvd,
    /// <summary>Magnitude pruning, then a weighted sum, on the A and B matrices.</summary>
    MagnitudePrune,
    /// <summary>Magnitude pruning of the deltas, then SVD.</summary>
    MagnitudePruneSvd,
}

/// <summary>PEFT's names of <see cref="AdapterCombination"/> and what each needs.</summary>
public static class AdapterCombinations
{
    private static readonly (AdapterCombination Kind, string Name)[] All =
    [
        (AdapterCombination.Linear, "linear"), (AdapterCombination.Cat, "cat"), (AdapterCombination.Svd, "svd"),
        (AdapterCombination.Ties, "ties"), (AdapterCombination.TiesSvd, "ties_svd"),
        (AdapterCombination.DareLinear, "dare_linear"), (AdapterCombination.DareLinearSvd, "dare_linear_svd"),
        (AdapterCombination.DareTies, "dare_ties"), (AdapterCombination.DareTiesSvd, "dare_ties_svd"),
        (AdapterCombination.MagnitudePrune, "magnitude_prune"), (AdapterCombination.MagnitudePruneSvd, "magnitude_prune_svd"),
    ];

    /// <summary>Every PEFT name, in PEFT's documentation order.</summary>
    public static IReadOnlyList<string> Names { get; } = All.Select(a => a.Name).ToArray();

    /// <summary>PEFT's name (<c>dare_ties_svd</c>).</summary>
    public static string Name(this AdapterCombination c) => All.First(a => a.Kind == c).Name;

    /// <summary>The combination PEFT calls <paramref name="name"/>; an <see cref="ArgumentException"/> listing the names otherwise.</summary>
    public static AdapterCombination Parse(string name) =>
        All.FirstOrDefault(a => a.Name == name) is { Name: not null } hit ? hit.Kind
            : throw new ArgumentException($"combination '{name}' is not one of {string.Join(", ", Names)}");

    /// <summary>True for the kinds that combine full deltas and factor them by SVD (<c>svd</c>, <c>*_svd</c>).</summary>
    public static bool IsSvd(this AdapterCombination c) => c is AdapterCombination.Svd or AdapterCombination.TiesSvd
        or AdapterCombination.DareLinearSvd or AdapterCombination.DareTiesSvd or AdapterCombination.MagnitudePruneSvd;

    /// <summary>True for the kinds that mix A with A and B with B element by element, so every adapter needs the same rank.</summary>
    public static bool NeedsEqualRanks(this AdapterCombination c) => c is AdapterCombination.Linear or AdapterCombination.Ties
        or AdapterCombination.DareLinear or AdapterCombination.DareTies or AdapterCombination.MagnitudePrune;

    /// <summary>The element-wise merge applied to the task tensors (A and B matrices, or deltas for the SVD kinds); null for <c>cat</c>.</summary>
    public static TaskMergeMethod? Method(this AdapterCombination c) => c switch
    {
        AdapterCombination.Linear or AdapterCombination.Svd => TaskMergeMethod.TaskArithmetic,
        AdapterCombination.Ties or AdapterCombination.TiesSvd => TaskMergeMethod.Ties,
        AdapterCombination.DareLinear or AdapterCombination.DareLinearSvd => TaskMergeMethod.DareLinear,
        AdapterCombination.DareTies or AdapterCombination.DareTiesSvd => TaskMergeMethod.DareTies,
        AdapterCombination.MagnitudePrune or AdapterCombination.MagnitudePruneSvd => TaskMergeMethod.MagnitudePrune,
        _ => null,
    };
}
