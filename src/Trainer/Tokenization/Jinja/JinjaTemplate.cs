using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// A chat template in the Jinja subset Hugging Face chat templates use, parsed once and rendered as transformers'
/// <c>apply_chat_template</c> does (trim_blocks, lstrip_blocks, the sandbox's read-only lists, transformers' tojson,
/// raise_exception and strftime_now). No Jinja engine for .NET is available; llama.cpp met the same need the same way.
/// Constructs outside the subset raise <see cref="JinjaNotSupportedException"/> naming the construct.
/// </summary>
public sealed class JinjaTemplate
{
    private readonly List<JinjaNode> _nodes;

    private JinjaTemplate(string source, List<JinjaNode> nodes)
    {
        Source = source;
        _nodes = nodes;
    }

    /// <summary>The template text.</summary>
    public string Source { get; }

    /// <summary>Parses a template.</summary>
    /// <exception cref="JinjaTemplateException">The template is malformed.</exception>
    /// <exception cref="JinjaNotSupportedException">It uses a statement this interpreter does not implement.</exception>
    public static JinjaTemplate Parse(string source)
    {
        ArgumentNullException.ThrowIfNull(source);
        return new JinjaTemplate(source, JinjaParser.Parse(source));
    }

    /// <summary>Renders with the given variables (JSON values become Python values: objects keep their key order).</summary>
    /// <param name="variables">Top-level names, e.g. messages, add_generation_prompt, bos_token.</param>
    /// <param name="now">What strftime_now reads as the current local time.</param>
    public string Render(IReadOnlyDictionary<string, JsonNode?> variables, DateTime now) => RenderWithGenerationSpans(variables, now).Text;

    /// <summary>As <see cref="Render"/>, also returning the output spans of <c>{% generation %}</c> blocks (transformers' assistant mask markers).</summary>
    public (string Text, IReadOnlyList<CharSpan> GenerationSpans) RenderWithGenerationSpans(IReadOnlyDictionary<string, JsonNode?> variables, DateTime now)
    {
        ArgumentNullException.ThrowIfNull(variables);
        var renderer = new JinjaRenderer(new JinjaGlobals(now));
        var scope = new JinjaRenderer.Scope(null);
        foreach (var (name, value) in variables)
            scope.Set(name, FromJson(value));
        var text = renderer.Render(_nodes, new JinjaRenderer.Scope(scope));
        return (text, renderer.GenerationSpans);
    }

    private static object? FromJson(JsonNode? node)
    {
        switch (node)
        {
            case null: return null;
            case JsonObject o:
            {
                var d = new OrderedDictionary<string, object?>(StringComparer.Ordinal);
                foreach (var (k, v) in o) d[k] = FromJson(v);
                return d;
            }
            case JsonArray a:
                return a.Select(FromJson).ToList();
            default:
            {
                var v = node.AsValue();
                if (v.TryGetValue<string>(out var s)) return s;
                if (v.TryGetValue<bool>(out var b)) return b;
                if (v.TryGetValue<long>(out var l)) return l;
                if (v.TryGetValue<int>(out var i)) return (long)i;
                if (v.TryGetValue<double>(out var d)) return d;
                var json = v.ToJsonString();
                if (long.TryParse(json, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out l)) return l;
                if (double.TryParse(json, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out d)) return d;
                throw new ArgumentException($"Unsupported JSON value {json} for a template variable.");
            }
        }
    }
}
