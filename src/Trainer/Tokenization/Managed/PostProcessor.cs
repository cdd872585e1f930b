using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// The post-processor of tokenizer.json for one sequence (what encode(text, add_special_tokens=True) adds):
/// TemplateProcessing's "single" template, RobertaProcessing/BertProcessing's cls … sep, ByteLevel (ids unchanged), or a
/// Sequence of those.
/// </summary>
internal abstract class PostProcessor
{
    public abstract List<int> Process(List<int> ids);

    /// <summary>The post-processor a tokenizer.json "post_processor" section describes, or null for none.</summary>
    public static PostProcessor? From(JsonNode? node, string source)
    {
        if (node is null)
            return null;
        if (node is not JsonObject o)
            throw new InvalidDataException($"{source}: tokenizer.json's post_processor is not an object.");
        var type = TokenizerJson.Type(o, "post_processor", source);
        return type switch
        {
            "ByteLevel" => null,
            "TemplateProcessing" => Template.From(o, source),
            "RobertaProcessing" or "BertProcessing" => new Around(PairId(o, "cls", type, source), PairId(o, "sep", type, source)),
            "Sequence" => new Sequence((o["processors"] as JsonArray ?? throw new InvalidDataException($"{source}: tokenizer.json's Sequence post_processor has no \"processors\" list."))
                .Select(n => From(n, source)).OfType<PostProcessor>().ToArray()),
            _ => throw TokenizerJson.Unsupported("post_processor", type, source),
        };
    }

    // "cls": ["<s>", 0]
    private static int PairId(JsonObject o, string key, string type, string source) =>
        o[key] is JsonArray { Count: 2 } pair && pair[1] is JsonValue v && v.TryGetValue<int>(out var id)
            ? id
            : throw new InvalidDataException($"{source}: tokenizer.json's {type} has no [token, id] \"{key}\".");

    private sealed class Around(int cls, int sep) : PostProcessor
    {
        public override List<int> Process(List<int> ids)
        {
            var result = new List<int>(ids.Count + 2) { cls };
            result.AddRange(ids);
            result.Add(sep);
            return result;
        }
    }

    private sealed class Template(int[]?[] pieces) : PostProcessor
    {
        // Each piece of the single template: the ids of a special token, or null for the sequence itself.
        public static Template From(JsonObject o, string source)
        {
            if (o["single"] is not JsonArray single)
                throw new InvalidDataException($"{source}: tokenizer.json's TemplateProcessing has no \"single\" template.");
            var specials = o["special_tokens"] as JsonObject;
            var pieces = new List<int[]?>();
            foreach (var item in single)
            {
                if (item is JsonObject { } p && p["Sequence"] is JsonObject)
                    pieces.Add(null);
                else if (item is JsonObject { } q && q["SpecialToken"] is JsonObject st && TokenizerJson.OptionalString(st, "id") is { } name)
                {
                    if (specials?[name] is not JsonObject spec || spec["ids"] is not JsonArray ids)
                        throw new InvalidDataException($"{source}: tokenizer.json's TemplateProcessing uses the special token '{name}' but special_tokens does not define its ids.");
                    pieces.Add(ids.Select(n => n!.GetValue<int>()).ToArray());
                }
                else
                    throw new InvalidDataException($"{source}: tokenizer.json's TemplateProcessing has a piece that is neither Sequence nor SpecialToken.");
            }
            return new Template([.. pieces]);
        }

        public override List<int> Process(List<int> ids)
        {
            var result = new List<int>(ids.Count + 4);
            foreach (var p in pieces)
            {
                if (p is null)
                    result.AddRange(ids);
                else
                    result.AddRange(p);
            }
            return result;
        }
    }

    private sealed class Sequence(PostProcessor[] steps) : PostProcessor
    {
        public override List<int> Process(List<int> ids)
        {
            foreach (var step in steps)
                ids = step.Process(ids);
            return ids;
        }
    }
}
