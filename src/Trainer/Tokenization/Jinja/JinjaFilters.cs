using System.Globalization;
using System.Net;

namespace QLora.Trainer;

/// <summary>The Jinja filters and tests chat templates use (transformers' own <c>tojson</c> included), with Jinja's behaviour.</summary>
internal static class JinjaFilters
{
    public static object? Apply(string name, object? v, List<object?> a, Dictionary<string, object?> k, int line, JinjaRenderer renderer)
    {
        object? Arg(int i, string key, object? fallback = null) => i >= 0 && i < a.Count ? a[i] : k.TryGetValue(key, out var x) ? x : fallback;
        switch (name)
        {
            case "trim":
                return Py.Strip(SoftStr(v), Arg(0, "chars") as string, true, true);
            case "tojson":
            {
                var indent = Arg(0, "indent");
                return JinjaJson.Dumps(v, indent is null ? null : (int)Py.ToLong(indent), Py.Truthy(Arg(-1, "sort_keys", false)),
                    Arg(-1, "separators") is { } sep ? Py.AsSequence(sep)?.Select(Py.Str).ToArray() : null, Py.Truthy(Arg(-1, "ensure_ascii", false)));
            }
            case "length" or "count":
                return Py.Length(v);
            case "string":
                return Py.Str(v);
            case "list":
                return Py.Iterate(v);
            case "first":
            {
                var items = Py.Iterate(v);
                return items.Count > 0 ? items[0] : new JinjaUndefined("first of an empty sequence");
            }
            case "last":
            {
                var items = Py.Iterate(v);
                return items.Count > 0 ? items[^1] : new JinjaUndefined("last of an empty sequence");
            }
            case "reverse":
                return v is string rs ? string.Concat(Py.Iterate(rs).Cast<string>().Reverse()) : Enumerable.Reverse(Py.Iterate(v)).ToList();
            case "join":
            {
                var sep = Arg(0, "d", "") as string ?? "";
                var items = Py.Iterate(v);
                if (Arg(1, "attribute") is { } attr) items = items.Select(x => Attribute(x, attr, line)).ToList();
                return string.Join(sep, items.Select(Py.Str));
            }
            case "upper": return SoftStr(v).ToUpperInvariant();
            case "lower": return SoftStr(v).ToLowerInvariant();
            case "title": return JinjaMembers.Title(SoftStr(v));
            case "capitalize":
            {
                var s = SoftStr(v);
                return s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant();
            }
            case "replace":
            {
                var s = Py.Str(v);
                var method = (JinjaCallable)JinjaMembers.GetAttribute(s, "replace", "value", line)!;
                return method.Invoke([Arg(0, "old"), Arg(1, "new"), .. a.Skip(2).Take(1), .. k.TryGetValue("count", out var c) ? [c] : Array.Empty<object?>()], []);
            }
            case "default" or "d":
            {
                var fallback = Arg(0, "default_value", "");
                bool boolean = Py.Truthy(Arg(1, "boolean", false));
                return v is JinjaUndefined || (boolean && !Py.Truthy(v)) ? fallback : v;
            }
            case "int":
                return v switch
                {
                    long or bool => Py.ToLong(v),
                    double d => (long)Math.Truncate(d),
                    string s when long.TryParse(s.Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture, out var l) => l,
                    string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var d) => (long)Math.Truncate(d),
                    _ => Arg(0, "default", 0L),
                };
            case "float":
                return v switch
                {
                    long or bool or double => Py.ToDouble(v),
                    string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var d) => d,
                    _ => Arg(0, "default", 0.0),
                };
            case "abs":
                return v is long l0 ? (object)Math.Abs(l0) : Math.Abs(Py.ToDouble(v));
            case "round":
            {
                int precision = (int)Py.ToLong(Arg(0, "precision", 0L));
                var method = Arg(1, "method", "common") as string;
                double d = Py.ToDouble(v), scale = Math.Pow(10, precision);
                return method switch
                {
                    "floor" => Math.Floor(d * scale) / scale,
                    "ceil" => Math.Ceiling(d * scale) / scale,
                    _ => Math.Round(d * scale, MidpointRounding.AwayFromZero) / scale,
                };
            }
            case "items":
                return v is OrderedDictionary<string, object?> dict ? dict.Select(kv => (object?)new object?[] { kv.Key, kv.Value }).ToList()
                    : v is JinjaUndefined ? new List<object?>() : throw Py.TypeError("a mapping", v);
            case "dictsort":
                return v is OrderedDictionary<string, object?> d2
                    ? d2.OrderBy(kv => kv.Key, StringComparer.OrdinalIgnoreCase).Select(kv => (object?)new object?[] { kv.Key, kv.Value }).ToList()
                    : throw Py.TypeError("a mapping", v);
            case "unique":
            {
                var result = new List<object?>();
                foreach (var x in Py.Iterate(v))
                    if (!result.Any(r => Py.Equals(r, x))) result.Add(x);
                return result;
            }
            case "sort":
            {
                var items = Py.Iterate(v);
                var attr = Arg(2, "attribute");
                var keyed = items.Select(x => (Key: attr is null ? x : Attribute(x, attr, line), Value: x)).ToList();
                var sorted = keyed.OrderBy(p => p.Key, Comparer<object?>.Create(Py.Compare)).Select(p => p.Value).ToList();
                if (Py.Truthy(Arg(0, "reverse", false))) sorted.Reverse();
                return sorted;
            }
            case "min" or "max":
            {
                var items = Py.Iterate(v);
                if (items.Count == 0) return new JinjaUndefined($"{name} of an empty sequence");
                var best = items[0];
                foreach (var x in items.Skip(1))
                    if ((Py.Compare(x, best) < 0) == (name == "min") && Py.Compare(x, best) != 0) best = x;
                return best;
            }
            case "sum":
            {
                object? total = Arg(1, "start", 0L);
                foreach (var x in Py.Iterate(v))
                {
                    var item = Arg(0, "attribute") is { } attr ? Attribute(x, attr, line) : x;
                    total = total is long t && item is long i ? (object)(t + i) : Py.ToDouble(total) + Py.ToDouble(item);
                }
                return total;
            }
            case "map":
            {
                var items = Py.Iterate(v);
                if (k.TryGetValue("attribute", out var attr))
                    return items.Select(x => Attribute(x, attr, line) is JinjaUndefined && k.TryGetValue("default", out var dflt) ? dflt : Attribute(x, attr, line)).ToList();
                if (a.Count == 0) throw new JinjaTemplateException($"Line {line}: map needs a filter name or attribute=.");
                var filter = RequireString(a[0], "map", line);
                return items.Select(x => Apply(filter, x, a.Skip(1).ToList(), [], line, renderer)).ToList();
            }
            case "select" or "reject":
            {
                bool keep = name == "select";
                return Py.Iterate(v).Where(x => (a.Count == 0 ? Py.Truthy(x) : Test(RequireString(a[0], name, line), x, a.Skip(1).ToList(), line, renderer)) == keep).ToList();
            }
            case "selectattr" or "rejectattr":
            {
                bool keep = name == "selectattr";
                if (a.Count == 0) throw new JinjaTemplateException($"Line {line}: {name} needs an attribute name.");
                return Py.Iterate(v).Where(x =>
                {
                    var value = Attribute(x, a[0], line);
                    return (a.Count == 1 ? Py.Truthy(value) : Test(RequireString(a[1], name, line), value, a.Skip(2).ToList(), line, renderer)) == keep;
                }).ToList();
            }
            case "indent":
            {
                var s = Py.Str(v);
                var width = Arg(0, "width", 4L);
                string pad = width is string w ? w : new string(' ', (int)Py.ToLong(width));
                bool first = Py.Truthy(Arg(1, "first", false)), blank = Py.Truthy(Arg(2, "blank", false));
                var lines = s.Split('\n');
                for (int i = 0; i < lines.Length; i++)
                {
                    if ((i > 0 || first) && (blank || lines[i].Trim().Length > 0)) lines[i] = pad + lines[i];
                }
                return string.Join('\n', lines);
            }
            case "wordcount":
                return (long)RequireString(v, name, line).Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Length;
            case "safe":
                return v;
            case "escape" or "e":
                return WebUtility.HtmlEncode(Py.Str(v)).Replace("&#39;", "&#39;", StringComparison.Ordinal);
            case "attr":
                return Attribute(v, Arg(0, "name"), line);
        }
        throw new JinjaNotSupportedException($"filter '{name}'", $"Line {line}: the chat template uses the filter |{name}, which this Jinja interpreter does not support.");
    }

    public static bool Test(string name, object? v, List<object?> a, int line, JinjaRenderer renderer)
    {
        object? Arg0() => a.Count > 0 ? a[0] : throw new JinjaTemplateException($"Line {line}: test '{name}' needs an argument.");
        switch (name)
        {
            case "defined": return v is not JinjaUndefined;
            case "undefined": return v is JinjaUndefined;
            case "none": return v is null;
            case "boolean": return v is bool;
            case "true": return v is true;
            case "false": return v is false;
            case "integer": return v is long;
            case "float": return v is double;
            case "number": return v is long or double or bool;
            case "string": return v is string;
            case "mapping": return v is OrderedDictionary<string, object?>;
            case "sequence": return v is string or List<object?> or object?[] or OrderedDictionary<string, object?>;
            case "iterable": return v is string or List<object?> or object?[] or OrderedDictionary<string, object?>;
            case "callable": return v is JinjaCallable;
            case "odd": return Py.ToLong(v) % 2 != 0;
            case "even": return Py.ToLong(v) % 2 == 0;
            case "divisibleby": return Py.ToLong(v) % Py.ToLong(Arg0()) == 0;
            case "sameas": return v is null ? Arg0() is null : v is bool b ? Arg0() is bool c && b == c : ReferenceEquals(v, Arg0());
            case "eq" or "equalto" or "==": return Py.Equals(v, Arg0());
            case "ne" or "!=": return !Py.Equals(v, Arg0());
            case "lt" or "lessthan" or "<": return Py.Compare(v, Arg0()) < 0;
            case "le" or "<=": return Py.Compare(v, Arg0()) <= 0;
            case "gt" or "greaterthan" or ">": return Py.Compare(v, Arg0()) > 0;
            case "ge" or ">=": return Py.Compare(v, Arg0()) >= 0;
            case "in": return Py.Contains(Arg0(), v);
            case "lower": return v is string s && s == s.ToLowerInvariant();
            case "upper": return v is string u && u == u.ToUpperInvariant();
        }
        throw new JinjaNotSupportedException($"test '{name}'", $"Line {line}: the chat template uses the test 'is {name}', which this Jinja interpreter does not support.");
    }

    // Jinja's attribute lookup for filters (dots walk into nested values: "function.name").
    private static object? Attribute(object? item, object? attribute, int line)
    {
        if (attribute is long index) return JinjaMembers.GetItem(item, index, "item", line);
        var path = Py.Str(attribute);
        foreach (var part in path.Split('.'))
        {
            item = item is JinjaUndefined ? item : JinjaMembers.GetItem(item, long.TryParse(part, out var n) ? n : part, "item", line);
        }
        return item;
    }

    // Jinja's soft_str: string filters print their input first (an undefined value is "").
    private static string SoftStr(object? v) => Py.Str(v);

    private static string RequireString(object? v, string filter, int line) =>
        v as string ?? (v is JinjaUndefined u ? throw new JinjaTemplateException($"Line {line}: '{u.Name}' is undefined (filter |{filter}).")
            : throw new JinjaTemplateException($"Line {line}: the filter |{filter} needs a string, got {Py.TypeName(v)}."));
}
