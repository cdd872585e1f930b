using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// The RoPE of a layer: its base θ and scaling. transformers v4 writes <c>rope_theta</c> at the top level of config.json
/// and the scaling in <c>rope_scaling</c>; v5 keeps both in <c>rope_parameters</c>, one block for the model or one per
/// layer type (its keys then being names from <c>layer_types</c>). Both layouts are read, with v5's precedence
/// (<c>rope_scaling</c>, else <c>rope_parameters</c>; θ from the block, else the top level, else 10000), so the same
/// weights give the same frequencies whichever transformers wrote the file.
/// </summary>
public sealed record RopeParameters(double Theta, RopeScaling? Scaling)
{
    /// <summary>RoPE types this project computes; any other is refused by name.</summary>
    public static readonly IReadOnlyList<string> SupportedTypes = ["default", "linear", "llama3"];

    /// <summary>What a config.json says: one RoPE for every layer, or one per layer type.</summary>
    public sealed record Layout(RopeParameters Global, IReadOnlyDictionary<string, RopeParameters>? ByLayerType);

    /// <summary>
    /// Reads the RoPE of config.json object <paramref name="config"/>; throws <see cref="FormatException"/> naming the
    /// field for a RoPE type or option that is not implemented or a required value that is missing.
    /// </summary>
    public static Layout Read(JsonObject config, int maxPositionEmbeddings, IReadOnlyList<string>? layerTypes)
    {
        double theta = LlamaConfig.Double(config, "rope_theta", 10000.0);
        var (key, node) = config["rope_scaling"] is JsonNode rs ? ("rope_scaling", rs) : ("rope_parameters", config["rope_parameters"]);
        if (node is null) return new Layout(new RopeParameters(theta, null), null);
        if (node is not JsonObject block) throw new FormatException($"field {key} = {node.ToJsonString()} is not an object");
        if (layerTypes is not null && block.Count > 0 && block.All(kv => layerTypes.Contains(kv.Key)))
        {
            var byType = new Dictionary<string, RopeParameters>(StringComparer.Ordinal);
            foreach (var (type, entry) in block)
                byType[type] = entry is JsonObject o ? Parse(o, $"{key}.{type}", theta, maxPositionEmbeddings)
                    : throw new FormatException($"field {key}.{type} = {entry?.ToJsonString() ?? "null"} is not an object");
            if (layerTypes.FirstOrDefault(t => !byType.ContainsKey(t)) is { } missing)
                throw new FormatException($"{key} has no entry for layer type {missing}");
            return new Layout(byType[layerTypes[0]], byType.Values.Distinct().Count() == 1 ? null : byType);
        }
        return new Layout(Parse(block, key, theta, maxPositionEmbeddings), null);
    }

    private static RopeParameters Parse(JsonObject o, string where, double fallbackTheta, int maxPositionEmbeddings)
    {
        string type = Text(o, "rope_type", where) ?? Text(o, "type", where) ?? "default";
        if (!SupportedTypes.Contains(type))
            throw new FormatException($"{where}: RoPE type '{type}' is not supported (supported: {string.Join(", ", SupportedTypes)})");
        double theta = Number(o, "rope_theta", where) ?? fallbackTheta;
        if (Number(o, "partial_rotary_factor", where) is double partial && partial != 1.0)
            throw new FormatException($"{where}: partial_rotary_factor {partial} is not supported (RoPE over the whole head only)");
        double Required(string name) => Number(o, name, where) ?? throw new FormatException($"{where}: RoPE type '{type}' needs {name}");
        RopeScaling? scaling = type switch
        {
            "linear" => new RopeScaling(type, Required("factor")),
            "llama3" => new RopeScaling(type, Required("factor"), Required("low_freq_factor"), Required("high_freq_factor"),
                (int)(Number(o, "original_max_position_embeddings", where) ?? maxPositionEmbeddings)),
            _ => null,
        };
        return new RopeParameters(theta, scaling);
    }

    private static string? Text(JsonObject o, string name, string where)
    {
        if (o[name] is null) return null;
        return o[name] is JsonValue v && v.TryGetValue<string>(out var s) ? s : throw new FormatException($"field {where}.{name} = {o[name]!.ToJsonString()} is not a string");
    }

    private static double? Number(JsonObject o, string name, string where)
    {
        if (o[name] is null) return null;
        try { return o[name]!.GetValue<double>(); }
        catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new FormatException($"field {where}.{name} = {o[name]!.ToJsonString()} is not a number"); }
    }
}

/// <summary>
/// RoPE scaling: "llama3" (Llama 3.1+: per-frequency scaling between low and high wavelength bounds) or "linear"
/// (every frequency divided by the factor).
/// </summary>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor = 1, double HighFreqFactor = 4, int OriginalMaxPositionEmbeddings = 8192);
