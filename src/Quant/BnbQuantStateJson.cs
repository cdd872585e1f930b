using System.Globalization;
using System.Text;
using System.Text.Json;

namespace QLora.Quant;

/// <summary>
/// The per-tensor <c>quant_state.bitsandbytes__nf4</c> JSON: written exactly as Python's <c>json.dumps</c> defaults
/// print it (", " and ": " separators, bitsandbytes' key order), read tolerantly (any order, any whitespace).
/// </summary>
public static class BnbQuantStateJson
{
    /// <summary>The fields of the JSON; the nested ones are null without double quantization.</summary>
    public sealed record Fields(QuantType QuantType, int Blocksize, FloatType DType, long[] Shape,
        int? NestedBlocksize = null, string? NestedDType = null, float? NestedOffset = null);

    /// <summary>The JSON bitsandbytes writes for this state.</summary>
    public static string Serialize(QuantState state)
    {
        var sb = new StringBuilder();
        sb.Append("{\"quant_type\": \"").Append(state.QuantType.Name()).Append('"');
        sb.Append(", \"blocksize\": ").Append(state.Blocksize.ToString(CultureInfo.InvariantCulture));
        sb.Append(", \"dtype\": \"").Append(state.DType.Name()).Append('"');
        sb.Append(", \"shape\": [").Append(string.Join(", ", state.Shape.Select(d => d.ToString(CultureInfo.InvariantCulture)))).Append(']');
        if (state.Nested is { } nested)
        {
            sb.Append(", \"nested_blocksize\": ").Append(nested.Blocksize.ToString(CultureInfo.InvariantCulture));
            sb.Append(", \"nested_dtype\": \"float32\"");
            sb.Append(", \"nested_offset\": ").Append(PythonFloat.Repr(nested.Offset));
        }
        sb.Append('}');
        return sb.ToString();
    }

    /// <summary>Parses the JSON (UTF-8 bytes); throws <see cref="FormatException"/> naming the bad or missing field.</summary>
    public static Fields Parse(ReadOnlySpan<byte> utf8)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(utf8.ToArray()); }
        catch (JsonException e) { throw new FormatException($"quant state is not valid JSON: {e.Message}"); }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new FormatException("quant state JSON is not an object");
            var quantType = QuantTypes.Parse(GetString(root, "quant_type"));
            int blocksize = GetInt(root, "blocksize");
            var dtype = FloatTypes.Parse(GetString(root, "dtype"));
            if (!root.TryGetProperty("shape", out var shapeEl) || shapeEl.ValueKind != JsonValueKind.Array)
                throw new FormatException("quant state has no \"shape\" array");
            var shape = new long[shapeEl.GetArrayLength()];
            int i = 0;
            foreach (var d in shapeEl.EnumerateArray())
            {
                if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out shape[i]) || shape[i] < 0)
                    throw new FormatException($"quant state shape entry {i} is not a non-negative integer");
                i++;
            }
            if (!root.TryGetProperty("nested_offset", out var offsetEl))
                return new Fields(quantType, blocksize, dtype, shape);
            if (offsetEl.ValueKind != JsonValueKind.Number) throw new FormatException("quant state \"nested_offset\" is not a number");
            int nestedBlocksize = root.TryGetProperty("nested_blocksize", out _) ? GetInt(root, "nested_blocksize") : DoubleQuantizer.NestedBlocksize;
            string nestedDType = root.TryGetProperty("nested_dtype", out var nd) && nd.ValueKind == JsonValueKind.String ? nd.GetString()! : "float32";
            return new Fields(quantType, blocksize, dtype, shape, nestedBlocksize, nestedDType, (float)offsetEl.GetDouble());
        }
    }

    private static string GetString(JsonElement root, string name) =>
        root.TryGetProperty(name, out var el) && el.ValueKind == JsonValueKind.String
            ? el.GetString()!
            : throw new FormatException($"quant state has no string \"{name}\"");

    private static int GetInt(JsonElement root, string name) =>
        root.TryGetProperty(name, out var el) && el.ValueKind == JsonValueKind.Number && el.TryGetInt32(out var v)
            ? v
            : throw new FormatException($"quant state has no integer \"{name}\"");
}
