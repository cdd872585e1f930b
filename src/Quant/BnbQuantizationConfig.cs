using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace QLora.Quant;

/// <summary>The <c>quantization_config</c> block transformers writes into config.json for a bnb 4-bit checkpoint.</summary>
public sealed record BnbQuantizationConfig
{
    /// <summary>nf4 or fp4.</summary>
    public QuantType QuantType { get; init; } = QuantType.Nf4;
    /// <summary>Whether the absmax is double-quantized.</summary>
    public bool DoubleQuant { get; init; } = true;
    /// <summary>The dtype matmuls run in after dequantization.</summary>
    public FloatType ComputeDType { get; init; } = FloatType.BFloat16;
    /// <summary>The storage dtype name of packed weights ("uint8" unless a checkpoint says otherwise).</summary>
    public string QuantStorage { get; init; } = "uint8";
    /// <summary>llm_int8_skip_modules: patterns of the modules left unquantized (see <see cref="SkipsModule"/>), or null.</summary>
    public IReadOnlyList<string>? SkipModules { get; init; }

    /// <summary>
    /// True if module <paramref name="moduleName"/> (e.g. <c>model.layers.0.mlp.down_proj</c>) is one that
    /// <see cref="SkipModules"/> keeps dense, by transformers' rule (should_convert_module): an entry matches when, read
    /// as a regular expression, it matches at the start of the name, or when the name ends with it — so a full name, a
    /// prefix such as <c>model.layers.0.mlp</c>, or a last part such as <c>lm_head</c> or <c>down_proj</c>.
    /// </summary>
    public bool SkipsModule(string moduleName)
    {
        foreach (var key in SkipModules ?? [])
        {
            if (moduleName.EndsWith(key, StringComparison.Ordinal)) return true;
            try { if (Regex.IsMatch(moduleName, @"\A(?:" + key + ")", RegexOptions.CultureInvariant)) return true; }
            catch (ArgumentException) { throw new FormatException($"quantization_config.llm_int8_skip_modules entry '{key}' is not a valid regular expression"); }
        }
        return false;
    }

    /// <summary>The block with every key transformers writes, in its (sorted) order.</summary>
    public JsonObject ToJson() => new()
    {
        ["_load_in_4bit"] = true,
        ["_load_in_8bit"] = false,
        ["bnb_4bit_compute_dtype"] = ComputeDType.Name(),
        ["bnb_4bit_quant_storage"] = QuantStorage,
        ["bnb_4bit_quant_type"] = QuantType.Name(),
        ["bnb_4bit_use_double_quant"] = DoubleQuant,
        ["llm_int8_enable_fp32_cpu_offload"] = false,
        ["llm_int8_has_fp16_weight"] = false,
        ["llm_int8_skip_modules"] = SkipModules is null ? null : new JsonArray(SkipModules.Select(s => (JsonNode?)JsonValue.Create(s)).ToArray()),
        ["llm_int8_threshold"] = JsonNode.Parse("6.0"), // keeps Python's "6.0" spelling
        ["load_in_4bit"] = true,
        ["load_in_8bit"] = false,
        ["quant_method"] = "bitsandbytes",
    };

    /// <summary>
    /// Reads the block from a config.json object; null when there is none. Older configs lack
    /// <c>bnb_4bit_quant_storage</c> (uint8). Throws <see cref="FormatException"/> for a non-bitsandbytes or 8-bit config.
    /// </summary>
    public static BnbQuantizationConfig? FromConfig(JsonObject config)
    {
        if (config["quantization_config"] is not JsonObject q) return null;
        string method = q["quant_method"]?.GetValue<string>() ?? "bitsandbytes";
        if (method != "bitsandbytes") throw new FormatException($"quantization_config.quant_method is '{method}'; only bitsandbytes 4-bit checkpoints are supported");
        bool in4 = (q["load_in_4bit"]?.GetValue<bool>() ?? false) || (q["_load_in_4bit"]?.GetValue<bool>() ?? false);
        if (!in4) throw new FormatException("quantization_config is not load_in_4bit; only bitsandbytes 4-bit checkpoints are supported");
        return new BnbQuantizationConfig
        {
            QuantType = QuantTypes.Parse(q["bnb_4bit_quant_type"]?.GetValue<string>() ?? "fp4"),
            DoubleQuant = q["bnb_4bit_use_double_quant"]?.GetValue<bool>() ?? false,
            ComputeDType = FloatTypes.Parse(q["bnb_4bit_compute_dtype"]?.GetValue<string>() ?? "float32"),
            QuantStorage = q["bnb_4bit_quant_storage"]?.GetValue<string>() ?? "uint8",
            SkipModules = q["llm_int8_skip_modules"] is JsonArray a ? a.Select(n => n!.GetValue<string>()).ToList() : null,
        };
    }
}
