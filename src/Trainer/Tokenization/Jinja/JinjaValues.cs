using System.Globalization;
using System.Text;
using QLora.Quant;

namespace QLora.Trainer;

/// <summary>Jinja's <c>Undefined</c>: what a missing variable, key or attribute evaluates to. Prints as "", is false, iterates as empty.</summary>
internal sealed class JinjaUndefined(string name)
{
    public string Name { get; } = name;
}

/// <summary>Jinja's <c>namespace(...)</c>: the one mutable object, whose attributes <c>{% set ns.x = … %}</c> may change from inside loops.</summary>
internal sealed class JinjaNamespace
{
    public OrderedDictionary<string, object?> Attributes { get; } = new(StringComparer.Ordinal);
}

/// <summary>A callable value: a global function, a macro, or a bound string/dict method.</summary>
internal sealed class JinjaCallable(string name, Func<List<object?>, Dictionary<string, object?>, object?> invoke)
{
    public string Name { get; } = name;

    public object? Invoke(List<object?> args, Dictionary<string, object?> kwargs) => invoke(args, kwargs);
}

/// <summary>The <c>loop</c> variable of a for loop.</summary>
internal sealed class JinjaLoop(IReadOnlyList<object?> items)
{
    public int Index0 { get; set; }

    public object? Get(string name) => name switch
    {
        "index" => (long)(Index0 + 1),
        "index0" => (long)Index0,
        "revindex" => (long)(items.Count - Index0),
        "revindex0" => (long)(items.Count - Index0 - 1),
        "first" => Index0 == 0,
        "last" => Index0 == items.Count - 1,
        "length" => (long)items.Count,
        "previtem" => Index0 > 0 ? items[Index0 - 1] : new JinjaUndefined("loop.previtem"),
        "nextitem" => Index0 + 1 < items.Count ? items[Index0 + 1] : new JinjaUndefined("loop.nextitem"),
        "depth" => 1L,
        "depth0" => 0L,
        "cycle" => new JinjaCallable("loop.cycle", (args, _) => args.Count == 0 ? throw new JinjaTemplateException("loop.cycle needs at least one value.") : args[Index0 % args.Count]),
        _ => new JinjaUndefined("loop." + name),
    };
}

/// <summary>Python semantics for the values templates compute with: None (null), bool, long, double, string, lists, tuples (object?[]), dicts.</summary>
internal static class Py
{
    public static bool IsUndefined(object? v) => v is JinjaUndefined;

    public static bool Truthy(object? v) => v switch
    {
        null or JinjaUndefined => false,
        bool b => b,
        long l => l != 0,
        double d => d != 0,
        string s => s.Length > 0,
        System.Collections.ICollection c => c.Count > 0,
        _ => true,
    };

    public static string TypeName(object? v) => v switch
    {
        null => "NoneType",
        JinjaUndefined => "Undefined",
        bool => "bool",
        long => "int",
        double => "float",
        string => "str",
        object?[] => "tuple",
        List<object?> => "list",
        OrderedDictionary<string, object?> => "dict",
        JinjaNamespace => "Namespace",
        JinjaCallable => "function",
        _ => v.GetType().Name,
    };

    /// <summary>Python's str(): what {{ value }} prints.</summary>
    public static string Str(object? v) => v switch
    {
        string s => s,
        JinjaUndefined => "",
        _ => Repr(v),
    };

    /// <summary>Python's repr().</summary>
    public static string Repr(object? v)
    {
        switch (v)
        {
            case null: return "None";
            case JinjaUndefined: return "";
            case bool b: return b ? "True" : "False";
            case long l: return l.ToString(CultureInfo.InvariantCulture);
            case double d: return double.IsFinite(d) ? PythonFloat.Repr(d) : double.IsNaN(d) ? "nan" : d > 0 ? "inf" : "-inf";
            case string s: return ReprString(s);
            case object?[] t: return "(" + string.Join(", ", t.Select(Repr)) + (t.Length == 1 ? ",)" : ")");
            case List<object?> list: return "[" + string.Join(", ", list.Select(Repr)) + "]";
            case OrderedDictionary<string, object?> dict: return "{" + string.Join(", ", dict.Select(kv => ReprString(kv.Key) + ": " + Repr(kv.Value))) + "}";
            case JinjaNamespace ns: return "<Namespace " + string.Join(", ", ns.Attributes.Select(kv => kv.Key + "=" + Repr(kv.Value))) + ">";
            case JinjaCallable f: return "<function " + f.Name + ">";
            default: return v.ToString() ?? "";
        }
    }

    private static string ReprString(string s)
    {
        char quote = s.Contains('\'') && !s.Contains('"') ? '"' : '\'';
        var sb = new StringBuilder().Append(quote);
        foreach (char c in s)
        {
            switch (c)
            {
                case '\\': sb.Append(@"\\"); break;
                case '\n': sb.Append(@"\n"); break;
                case '\r': sb.Append(@"\r"); break;
                case '\t': sb.Append(@"\t"); break;
                default:
                    if (c == quote) sb.Append('\\').Append(c);
                    else if (c < 0x20 || c == 0x7f) sb.Append(CultureInfo.InvariantCulture, $"\\x{(int)c:x2}");
                    else sb.Append(c);
                    break;
            }
        }
        return sb.Append(quote).ToString();
    }

    public static bool IsNumber(object? v) => v is long or double or bool;

    public static double ToDouble(object? v) => v switch { long l => l, double d => d, bool b => b ? 1 : 0, _ => throw TypeError("a number", v) };

    public static long ToLong(object? v) => v switch { long l => l, bool b => b ? 1 : 0, double d => (long)d, _ => throw TypeError("an integer", v) };

    public static JinjaTemplateException TypeError(string expected, object? v) =>
        v is JinjaUndefined u ? new JinjaTemplateException($"'{u.Name}' is undefined.") : new JinjaTemplateException($"expected {expected}, got {TypeName(v)} {Shorten(Repr(v))}.");

    private static string Shorten(string s) => s.Length <= 60 ? s : s[..60] + "…";

    public static new bool Equals(object? a, object? b)
    {
        if (a is JinjaUndefined || b is JinjaUndefined) return a is JinjaUndefined && b is JinjaUndefined;
        if (a is null || b is null) return a is null && b is null;
        if (IsNumber(a) && IsNumber(b))
            return a is double || b is double ? ToDouble(a) == ToDouble(b) : ToLong(a) == ToLong(b);
        if (a is string sa && b is string sb) return string.Equals(sa, sb, StringComparison.Ordinal);
        if (a is List<object?> la && b is List<object?> lb) return la.Count == lb.Count && la.Zip(lb).All(p => Equals(p.First, p.Second));
        if (a is object?[] ta && b is object?[] tb) return ta.Length == tb.Length && ta.Zip(tb).All(p => Equals(p.First, p.Second));
        if (a is OrderedDictionary<string, object?> da && b is OrderedDictionary<string, object?> db)
            return da.Count == db.Count && da.All(kv => db.TryGetValue(kv.Key, out var other) && Equals(kv.Value, other));
        return ReferenceEquals(a, b);
    }

    public static int Compare(object? a, object? b)
    {
        if (IsNumber(a) && IsNumber(b))
            return a is double || b is double ? ToDouble(a).CompareTo(ToDouble(b)) : ToLong(a).CompareTo(ToLong(b));
        if (a is string sa && b is string sb) return string.CompareOrdinal(sa, sb);
        if (AsSequence(a) is { } xa && AsSequence(b) is { } xb && a?.GetType() == b?.GetType())
        {
            for (int i = 0; i < Math.Min(xa.Count, xb.Count); i++)
            {
                int c = Compare(xa[i], xb[i]);
                if (c != 0) return c;
            }
            return xa.Count.CompareTo(xb.Count);
        }
        throw new JinjaTemplateException($"'<' not supported between {TypeName(a)} and {TypeName(b)}.");
    }

    public static IReadOnlyList<object?>? AsSequence(object? v) => v switch
    {
        List<object?> l => l,
        object?[] t => t,
        _ => null,
    };

    /// <summary>What a for loop or a filter iterates: list/tuple items, dict keys, string characters; Undefined is empty.</summary>
    public static List<object?> Iterate(object? v) => v switch
    {
        JinjaUndefined => [],
        List<object?> l => [.. l],
        object?[] t => [.. t],
        OrderedDictionary<string, object?> d => [.. d.Keys],
        string s => [.. TextElements(s)],
        _ => throw new JinjaTemplateException($"{TypeName(v)} {Shorten(Repr(v))} is not iterable."),
    };

    // Python iterates code points; surrogate pairs stay together.
    private static IEnumerable<object?> TextElements(string s)
    {
        for (int i = 0; i < s.Length; i++)
        {
            if (char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]))
            {
                yield return s.Substring(i++, 2);
            }
            else
            {
                yield return s[i].ToString();
            }
        }
    }

    public static bool Contains(object? container, object? item) => container switch
    {
        string s => item is string sub ? s.Contains(sub, StringComparison.Ordinal) : throw new JinjaTemplateException($"'in <string>' requires a string, not {TypeName(item)}."),
        OrderedDictionary<string, object?> d => item is string key && d.ContainsKey(key),
        JinjaUndefined => false, // Undefined iterates as empty
        _ => Iterate(container).Any(x => Equals(x, item)),
    };

    public static long Length(object? v) => v switch
    {
        string s => s.EnumerateRunes().Count(),
        System.Collections.ICollection c => c.Count,
        JinjaUndefined => 0,
        _ => throw new JinjaTemplateException($"object of type {TypeName(v)} has no len()."),
    };

    /// <summary>Python's str.strip() whitespace: Unicode white space plus the separators U+001C–U+001F.</summary>
    public static bool IsSpace(char c) => char.IsWhiteSpace(c) || c is >= '\x1c' and <= '\x1f';

    public static string Strip(string s, string? chars, bool left, bool right)
    {
        int start = 0, end = s.Length;
        Func<char, bool> strip = chars is null ? IsSpace : chars.Contains;
        if (left) while (start < end && strip(s[start])) start++;
        if (right) while (end > start && strip(s[end - 1])) end--;
        return s[start..end];
    }
}
