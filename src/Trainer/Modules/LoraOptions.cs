using System.Text.RegularExpressions;

namespace QLora.Trainer;

/// <summary>How adapters are attached, in PEFT's terms (<c>LoraConfig</c>).</summary>
public sealed record LoraOptions
{
    /// <summary>The linear layers of a Llama decoder layer.</summary>
    public static readonly IReadOnlyList<string> AllLinear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary>Rank r.</summary>
    public int Rank { get; init; } = 16;
    /// <summary>lora_alpha: the update is scaled by alpha / r (or alpha / √r with rsLoRA).</summary>
    public double Alpha { get; init; } = 16;
    /// <summary>Dropout on the adapter's input.</summary>
    public double Dropout { get; init; }
    /// <summary>Scale by alpha / √r (rank-stabilised LoRA).</summary>
    public bool UseRsLora { get; init; }
    /// <summary>
    /// PEFT's use_dora (weight-decomposed LoRA): each adapted layer also trains a magnitude vector m [out], and its weight
    /// becomes <c>m · (W + scaling·B·A) / ‖W + scaling·B·A‖</c> row by row, the norm treated as a constant in backward.
    /// </summary>
    public bool UseDora { get; init; }
    /// <summary>
    /// Modules to adapt, as PEFT matches a list: a full module name, or a dot-delimited suffix of one (<c>q_proj</c>,
    /// <c>self_attn.q_proj</c>, <c>layers.0.mlp.up_proj</c>); ignored when <see cref="TargetRegex"/> is set.
    /// </summary>
    public IReadOnlyList<string> TargetModules { get; init; } = AllLinear;
    /// <summary>A regex over the full module name (PEFT's string form of target_modules), or null.</summary>
    public string? TargetRegex { get; init; }
    /// <summary>PEFT's exclude_modules as a list: modules (full names or dot-delimited suffixes) never adapted, or null.</summary>
    public IReadOnlyList<string>? ExcludeModules { get; init; }
    /// <summary>PEFT's exclude_modules as a string: a regex over full module names never adapted, or null.</summary>
    public string? ExcludeRegex { get; init; }
    /// <summary>Decoder layer indices to adapt (PEFT layers_to_transform), or null for all.</summary>
    public IReadOnlyList<int>? LayersToTransform { get; init; }
    /// <summary>PEFT's layers_pattern: the name of the layer list whose index <see cref="LayersToTransform"/> reads, or null for the first numbered part.</summary>
    public IReadOnlyList<string>? LayersPattern { get; init; }
    /// <summary>PEFT initialisation: "kaiming" (A kaiming-uniform with a = √5, B zeros; PEFT's default) or "gaussian" (A ~ N(0, 1/r)).</summary>
    public string Init { get; init; } = "kaiming";
    /// <summary>dtype of the adapter weights: float32 master weights (default) or bfloat16.</summary>
    public TorchSharp.torch.ScalarType DType { get; init; } = TorchSharp.torch.ScalarType.Float32;
    /// <summary>The adapter's name.</summary>
    public string AdapterName { get; init; } = "default";

    /// <summary>
    /// PEFT's rank_pattern: ranks other than <see cref="Rank"/> for the modules whose name a key matches (a regex over a
    /// suffix of the module name that starts at a dot, as PEFT's get_pattern_key); the first matching key wins.
    /// </summary>
    public IReadOnlyList<KeyValuePair<string, int>> RankPattern { get; init; } = [];
    /// <summary>PEFT's alpha_pattern: alphas other than <see cref="Alpha"/>, matched as <see cref="RankPattern"/>.</summary>
    public IReadOnlyList<KeyValuePair<string, double>> AlphaPattern { get; init; } = [];

    /// <summary>alpha / r, or alpha / √r with rsLoRA (of the defaults; a module's own is <see cref="ForModule"/>'s).</summary>
    public double Scaling => UseRsLora ? Alpha / Math.Sqrt(Rank) : Alpha / Rank;

    /// <summary>The rank of module <paramref name="fullName"/>: its <see cref="RankPattern"/> entry, else <see cref="Rank"/>.</summary>
    public int RankFor(string fullName) => PatternValue(RankPattern, fullName, Rank);

    /// <summary>The alpha of module <paramref name="fullName"/>: its <see cref="AlphaPattern"/> entry, else <see cref="Alpha"/>.</summary>
    public double AlphaFor(string fullName) => PatternValue(AlphaPattern, fullName, Alpha);

    /// <summary>These options with the rank and alpha of module <paramref name="fullName"/> and no patterns: what one layer's adapter uses.</summary>
    public LoraOptions ForModule(string fullName) =>
        RankPattern.Count == 0 && AlphaPattern.Count == 0 ? this : this with { Rank = RankFor(fullName), Alpha = AlphaFor(fullName), RankPattern = [], AlphaPattern = [] };

    /// <summary>The first key (in order) that matches a dot-delimited suffix of the module name, PEFT's rule.</summary>
    private static T PatternValue<T>(IReadOnlyList<KeyValuePair<string, T>> pattern, string fullName, T fallback)
    {
        foreach (var (key, value) in pattern)
            if (Regex.IsMatch(fullName, @"^(?:.*\.)?(?:" + key + ")$")) return value;
        return fallback;
    }

    /// <summary>Checks values; throws <see cref="ArgumentException"/> naming the bad one.</summary>
    public void Validate()
    {
        if (Rank <= 0) throw new ArgumentException($"LoRA rank {Rank}: must be >= 1");
        if (!(Alpha > 0)) throw new ArgumentException($"LoRA alpha {Alpha}: must be > 0");
        if (!(Dropout >= 0 && Dropout < 1)) throw new ArgumentException($"LoRA dropout {Dropout}: must be in [0, 1)");
        if (Init is not ("kaiming" or "gaussian")) throw new ArgumentException($"LoRA init '{Init}': must be kaiming or gaussian");
        if (DType is not (TorchSharp.torch.ScalarType.Float32 or TorchSharp.torch.ScalarType.BFloat16))
            throw new ArgumentException($"LoRA dtype {DType}: must be Float32 or BFloat16");
        if (TargetRegex is not null) _ = new Regex(TargetRegex);
        if (TargetRegex is not null && LayersToTransform is not null)
            throw new ArgumentException("layers_to_transform cannot be used when target_modules is a regex string (PEFT refuses it too)");
        if (TargetRegex is not null && LayersPattern is not null)
            throw new ArgumentException("layers_pattern cannot be used when target_modules is a regex string (PEFT refuses it too)");
        if (LayersPattern is { Count: > 0 } && LayersToTransform is null)
            throw new ArgumentException("layers_pattern needs layers_to_transform (PEFT refuses it alone)");
        if (ExcludeRegex is not null) _ = new Regex(ExcludeRegex);
        foreach (var (key, r) in RankPattern)
        {
            if (r <= 0) throw new ArgumentException($"LoRA rank_pattern '{key}': rank {r} must be >= 1");
            _ = new Regex(key);
        }
        foreach (var (key, a) in AlphaPattern)
        {
            if (!(a > 0)) throw new ArgumentException($"LoRA alpha_pattern '{key}': alpha {a} must be > 0");
            _ = new Regex(key);
        }
    }

    /// <summary>
    /// True if the module at <paramref name="fullName"/> (e.g. <c>model.layers.3.self_attn.q_proj</c>) is a target, by
    /// PEFT's check_target_module_exists: not excluded; then a full match of <see cref="TargetRegex"/>, or a name in
    /// <see cref="TargetModules"/> equal to it, or one it ends with after a dot — in that last case only in a layer of
    /// <see cref="LayersToTransform"/> when that is set.
    /// </summary>
    public bool IsTarget(string fullName)
    {
        if (ExcludeRegex is not null && FullMatch(ExcludeRegex, fullName)) return false;
        if (ExcludeModules is not null && (ExcludeModules.Contains(fullName) || ExcludeModules.Any(k => fullName.EndsWith("." + k, StringComparison.Ordinal))))
            return false;
        if (TargetRegex is not null) return FullMatch(TargetRegex, fullName);
        if (TargetModules.Contains(fullName)) return true;
        if (!TargetModules.Any(t => fullName.EndsWith("." + t, StringComparison.Ordinal))) return false;
        if (LayersToTransform is not { Count: > 0 }) return true;
        Match m = Match.Empty;
        if (LayersPattern is not { Count: > 0 }) m = Regex.Match(fullName, @"\A.*?\.[^.]*\.(\d+)\.");
        else
            foreach (var pattern in LayersPattern)
                if ((m = Regex.Match(fullName, @"\A.*?\." + pattern + @"\.(\d+)\.")).Success) break;
        return m.Success && LayersToTransform.Contains(int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture));
    }

    private static bool FullMatch(string pattern, string s) => Regex.IsMatch(s, @"\A(?:" + pattern + @")\z");
}
