using System.Globalization;
using System.Text;
using QLora.Quant;

namespace QLora.Trainer;

/// <summary>
/// transformers' <c>tojson</c> filter: Python's <c>json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)</c>,
/// byte for byte (", " and ": " without indent, "," and newlines with one; no HTML escaping, unlike Jinja's own tojson).
/// </summary>
internal static class JinjaJson
{
    public static string Dumps(object? value, int? indent, bool sortKeys, string[]? separators, bool ensureAscii)
    {
        string item = separators?.Length == 2 ? separators[0] : indent is null ? ", " : ",";
        string key = separators?.Length == 2 ? separators[1] : ": ";
        var sb = new StringBuilder();
        Write(sb, value, indent, 0, sortKeys, item, key, ensureAscii);
        return sb.ToString();
    }

    private static void Write(StringBuilder sb, object? v, int? indent, int depth, bool sortKeys, string item, string key, bool ascii)
    {
        switch (v)
        {
            case null: sb.Append("null"); return;
            case JinjaUndefined u: throw new JinjaTemplateException($"'{u.Name}' is undefined (tojson).");
            case bool b: sb.Append(b ? "true" : "false"); return;
            case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); return;
            case double d: sb.Append(double.IsNaN(d) ? "NaN" : double.IsInfinity(d) ? (d > 0 ? "Infinity" : "-Infinity") : PythonFloat.Repr(d)); return;
            case string s: WriteString(sb, s, ascii); return;
            case OrderedDictionary<string, object?> dict:
            {
                if (dict.Count == 0) { sb.Append("{}"); return; }
                var pairs = sortKeys ? dict.OrderBy(kv => kv.Key, StringComparer.Ordinal).ToList() : [.. dict];
                sb.Append('{');
                for (int i = 0; i < pairs.Count; i++)
                {
                    if (i > 0) sb.Append(item);
                    NewLine(sb, indent, depth + 1);
                    WriteString(sb, pairs[i].Key, ascii);
                    sb.Append(key);
                    Write(sb, pairs[i].Value, indent, depth + 1, sortKeys, item, key, ascii);
                }
                NewLine(sb, indent, depth);
                sb.Append('}');
                return;
            }
            default:
                if (Py.AsSequence(v) is { } list)
                {
                    if (list.Count == 0) { sb.Append("[]"); return; }
                    sb.Append('[');
                    for (int i = 0; i < list.Count; i++)
                    {
                        if (i > 0) sb.Append(item);
                        NewLine(sb, indent, depth + 1);
                        Write(sb, list[i], indent, depth + 1, sortKeys, item, key, ascii);
                    }
                    NewLine(sb, indent, depth);
                    sb.Append(']');
                    return;
                }
                throw new JinjaTemplateException($"Object of type {Py.TypeName(v)} is not JSON serializable.");
        }
    }

    private static void NewLine(StringBuilder sb, int? indent, int depth)
    {
        if (indent is int n) sb.Append('\n').Append(' ', n * depth);
    }

    private static void WriteString(StringBuilder sb, string s, bool ascii)
    {
        sb.Append('"');
        foreach (char c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < 0x20 || (ascii && c > 0x7e)) sb.Append(CultureInfo.InvariantCulture, $"\\u{(int)c:x4}");
                    else sb.Append(c);
                    break;
            }
        }
        sb.Append('"');
    }
}
