using System.Text.RegularExpressions;

namespace QLora.Quant;

/// <summary>How <see cref="CheckpointQuantizer"/> quantizes: the bitsandbytes defaults unless told otherwise.</summary>
public sealed record QuantizeOptions
{
    /// <summary>The Linear weights inside decoder layers (q/k/v/o and gate/up/down projections).</summary>
    public const string DefaultInclude = @"\.(q|k|v|o|gate|up|down)_proj\.weight$";

    /// <summary>nf4 (default) or fp4.</summary>
    public QuantType QuantType { get; init; } = QuantType.Nf4;
    /// <summary>Elements per absmax block (default 64).</summary>
    public int Blocksize { get; init; } = 64;
    /// <summary>Double-quantize the absmax (default on).</summary>
    public bool DoubleQuant { get; init; } = true;
    /// <summary>Regex over tensor names; matching 2-D floating-point tensors are quantized, all others copied.</summary>
    public string Include { get; init; } = DefaultInclude;
    /// <summary>What to do with a tensor holding NaN or infinity: stop (default) or warn.</summary>
    public NonFinitePolicy NonFinite { get; init; } = NonFinitePolicy.Stop;

    /// <summary>
    /// Modules left dense whatever <see cref="Include"/> says, as llm_int8_skip_modules patterns (transformers' rule, see
    /// <see cref="BnbQuantizationConfig.SkipsModule"/>), or null: how a re-quantized merge keeps its base's dense modules.
    /// </summary>
    public IReadOnlyList<string>? SkipModules { get; init; }

    /// <summary>True if tensor <paramref name="t"/> is quantized: a non-empty 2-D float tensor that <paramref name="include"/> matches and no skip entry names.</summary>
    public bool Quantizes(TensorInfo t, Regex include) =>
        FloatTypes.FromTensorDType(t.DType) is not null && t.Shape.Length == 2 && t.ElementCount > 0 && include.IsMatch(t.Name)
        && !(SkipModules is not null && new BnbQuantizationConfig { SkipModules = SkipModules }.SkipsModule(ModuleOf(t.Name)));

    /// <summary>The module a weight belongs to: its name without <c>.weight</c>.</summary>
    public static string ModuleOf(string tensorName) =>
        tensorName.EndsWith(".weight", StringComparison.Ordinal) ? tensorName[..^".weight".Length] : tensorName;

    /// <summary>The compiled <see cref="Include"/>; throws <see cref="ArgumentException"/> with the pattern for an invalid regex.</summary>
    public Regex IncludeRegex()
    {
        try { return new Regex(Include, RegexOptions.CultureInvariant, TimeSpan.FromSeconds(1)); }
        catch (ArgumentException e) { throw new ArgumentException($"--include '{Include}' is not a valid regular expression: {e.Message}"); }
    }
}
