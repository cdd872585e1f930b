using System.Text;

namespace QLora.Trainer;

/// <summary>Attribute access, subscripts, slices and the string and dict methods chat templates call, with Python's behaviour.</summary>
internal static class JinjaMembers
{
    public static object? GetAttribute(object? target, string name, string described, int line)
    {
        switch (target)
        {
            case JinjaUndefined u:
                throw new JinjaTemplateException($"Line {line}: '{u.Name}' is undefined (reading .{name}).");
            case OrderedDictionary<string, object?> d:
                if (name is "items" or "keys" or "values" or "get") return DictMethod(d, name);
                return d.TryGetValue(name, out var v) ? v : new JinjaUndefined($"{described}.{name}");
            case string s:
                return StringMethod(s, name, line);
            case JinjaNamespace ns:
                return ns.Attributes.TryGetValue(name, out var a) ? a : new JinjaUndefined($"{described}.{name}");
            case JinjaLoop loop:
                return loop.Get(name);
            case List<object?> when name is "append" or "extend" or "pop" or "insert" or "remove" or "clear" or "sort" or "reverse":
                throw new JinjaTemplateException($"Line {line}: {described}.{name}() would modify a list, which transformers' sandbox forbids.");
            default:
                return new JinjaUndefined($"{described}.{name}");
        }
    }

    public static object? GetItem(object? target, object? index, string described, int line)
    {
        switch (target)
        {
            case JinjaUndefined u:
                throw new JinjaTemplateException($"Line {line}: '{u.Name}' is undefined (reading [{Py.Repr(index)}]).");
            case OrderedDictionary<string, object?> d:
                if (index is string key)
                    return d.TryGetValue(key, out var v) ? v : key is "items" or "keys" or "values" or "get" ? DictMethod(d, key) : new JinjaUndefined($"{described}[{Py.Repr(key)}]");
                return new JinjaUndefined($"{described}[{Py.Repr(index)}]");
            case string s when index is long or bool:
            {
                var chars = Py.Iterate(s);
                long i = Py.ToLong(index);
                if (i < 0) i += chars.Count;
                return i >= 0 && i < chars.Count ? chars[(int)i] : new JinjaUndefined($"{described}[{index}]");
            }
            case string or JinjaNamespace or JinjaLoop when index is string name:
                return GetAttribute(target, name, described, line);
            default:
                if (Py.AsSequence(target) is { } list && index is long or bool)
                {
                    long i = Py.ToLong(index);
                    if (i < 0) i += list.Count;
                    return i >= 0 && i < list.Count ? list[(int)i] : new JinjaUndefined($"{described}[{index}]");
                }
                return new JinjaUndefined($"{described}[{Py.Repr(index)}]");
        }
    }

    public static object? Slice(object? target, object? start, object? stop, object? step, int line)
    {
        if (target is JinjaUndefined u) throw new JinjaTemplateException($"Line {line}: '{u.Name}' is undefined (slicing it).");
        var items = target switch
        {
            string s => Py.Iterate(s),
            _ => Py.AsSequence(target) as IReadOnlyList<object?> ?? throw new JinjaTemplateException($"Line {line}: {Py.TypeName(target)} cannot be sliced."),
        };
        long n = items.Count;
        long st = step is null ? 1 : Py.ToLong(step);
        if (st == 0) throw new JinjaTemplateException($"Line {line}: slice step cannot be zero.");
        long Clamp(object? v, long fallback)
        {
            if (v is null) return fallback;
            long x = Py.ToLong(v);
            if (x < 0) x += n;
            return st > 0 ? Math.Clamp(x, 0, n) : Math.Clamp(x, -1, n - 1);
        }
        long a = Clamp(start, st > 0 ? 0 : n - 1), b = Clamp(stop, st > 0 ? n : -1);
        var picked = new List<object?>();
        for (long i = a; st > 0 ? i < b : i > b; i += st)
            picked.Add(items[(int)i]);
        return target switch
        {
            string => string.Concat(picked.Cast<string>()),
            object?[] => picked.ToArray(),
            _ => picked,
        };
    }

    private static JinjaCallable DictMethod(OrderedDictionary<string, object?> d, string name) => name switch
    {
        "items" => new("dict.items", (_, _) => d.Select(kv => (object?)new object?[] { kv.Key, kv.Value }).ToList()),
        "keys" => new("dict.keys", (_, _) => d.Keys.Select(k => (object?)k).ToList()),
        "values" => new("dict.values", (_, _) => d.Values.ToList()),
        _ => new("dict.get", (args, _) =>
        {
            if (args.Count is < 1 or > 2) throw new JinjaTemplateException("dict.get takes a key and an optional default.");
            return args[0] is string k && d.TryGetValue(k, out var v) ? v : args.Count == 2 ? args[1] : null;
        }),
    };

    private static object? StringMethod(string s, string name, int line)
    {
        Func<List<object?>, Dictionary<string, object?>, object?>? f = name switch
        {
            "strip" => (a, _) => Py.Strip(s, OptionalString(a, 0), true, true),
            "lstrip" => (a, _) => Py.Strip(s, OptionalString(a, 0), true, false),
            "rstrip" => (a, _) => Py.Strip(s, OptionalString(a, 0), false, true),
            "upper" => (_, _) => s.ToUpperInvariant(),
            "lower" => (_, _) => s.ToLowerInvariant(),
            "title" => (_, _) => Title(s),
            "capitalize" => (_, _) => s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant(),
            "startswith" => (a, _) => Affix(s, a, (x, p) => x.StartsWith(p, StringComparison.Ordinal)),
            "endswith" => (a, _) => Affix(s, a, (x, p) => x.EndsWith(p, StringComparison.Ordinal)),
            "split" => (a, k) => Split(s, Arg(a, k, 0, "sep") as string, Arg(a, k, 1, "maxsplit") is long m ? m : -1, fromRight: false),
            "rsplit" => (a, k) => Split(s, Arg(a, k, 0, "sep") as string, Arg(a, k, 1, "maxsplit") is long m ? m : -1, fromRight: true),
            "splitlines" => (_, _) => s.Split('\n').Select(x => (object?)x.TrimEnd('\r')).Take(s.EndsWith('\n') ? s.Split('\n').Length - 1 : int.MaxValue).ToList(),
            "replace" => (a, _) => Replace(s, RequireString(a, 0, "replace"), RequireString(a, 1, "replace"), a.Count > 2 ? Py.ToLong(a[2]) : -1),
            "find" => (a, _) => (long)s.IndexOf(RequireString(a, 0, "find"), StringComparison.Ordinal),
            "rfind" => (a, _) => (long)s.LastIndexOf(RequireString(a, 0, "rfind"), StringComparison.Ordinal),
            "count" => (a, _) => (long)CountOf(s, RequireString(a, 0, "count")),
            "join" => (a, _) => string.Join(s, Py.Iterate(a.Count == 1 ? a[0] : throw new JinjaTemplateException("str.join takes one argument.")).Select(x => x as string ?? throw Py.TypeError("strings to join", x))),
            "isdigit" => (_, _) => s.Length > 0 && s.All(char.IsDigit),
            "isalpha" => (_, _) => s.Length > 0 && s.All(char.IsLetter),
            "isspace" => (_, _) => s.Length > 0 && s.All(Py.IsSpace),
            "isupper" => (_, _) => s.Any(char.IsLetter) && !s.Any(char.IsLower),
            "islower" => (_, _) => s.Any(char.IsLetter) && !s.Any(char.IsUpper),
            _ => null,
        };
        if (f is null)
            throw new JinjaNotSupportedException($"string method '{name}'", $"Line {line}: the chat template calls the string method .{name}(), which this Jinja interpreter does not support.");
        return new JinjaCallable("str." + name, f);
    }

    private static object? Arg(List<object?> a, Dictionary<string, object?> k, int i, string name) =>
        i < a.Count ? a[i] : k.TryGetValue(name, out var v) ? v : null;

    private static string? OptionalString(List<object?> a, int i) => i < a.Count ? a[i] as string : null;

    private static string RequireString(List<object?> a, int i, string method) =>
        i < a.Count && a[i] is string s ? s : throw new JinjaTemplateException($"str.{method} needs a string as argument {i + 1}.");

    private static bool Affix(string s, List<object?> a, Func<string, string, bool> test)
    {
        if (a.Count == 0) throw new JinjaTemplateException("startswith/endswith need an argument.");
        return a[0] switch
        {
            string p => test(s, p),
            object?[] t => t.Any(x => x is string p && test(s, p)),
            var other => throw Py.TypeError("a string or a tuple of strings", other),
        };
    }

    private static List<object?> Split(string s, string? sep, long maxsplit, bool fromRight)
    {
        List<string> parts;
        if (sep is null)
        {
            parts = [];
            var words = new List<(int Start, int End)>();
            int i = 0;
            while (i < s.Length)
            {
                while (i < s.Length && Py.IsSpace(s[i])) i++;
                if (i >= s.Length) break;
                int start = i;
                while (i < s.Length && !Py.IsSpace(s[i])) i++;
                words.Add((start, i));
            }
            if (maxsplit < 0 || words.Count <= maxsplit + 1)
                return words.Select(w => (object?)s[w.Start..w.End]).ToList();
            if (!fromRight)
            {
                var head = words.Take((int)maxsplit).Select(w => (object?)s[w.Start..w.End]).ToList();
                head.Add(Py.Strip(s[words[(int)maxsplit].Start..], null, false, true));
                return head;
            }
            var tail = words.Skip(words.Count - (int)maxsplit).Select(w => (object?)s[w.Start..w.End]).ToList();
            tail.Insert(0, Py.Strip(s[..words[words.Count - (int)maxsplit - 1].End], null, true, false));
            return tail;
        }
        if (sep.Length == 0) throw new JinjaTemplateException("empty separator.");
        parts = [.. s.Split(sep)];
        if (maxsplit >= 0 && parts.Count > maxsplit + 1)
        {
            int keep = (int)maxsplit;
            parts = fromRight
                ? [string.Join(sep, parts.Take(parts.Count - keep)), .. parts.Skip(parts.Count - keep)]
                : [.. parts.Take(keep), string.Join(sep, parts.Skip(keep))];
        }
        return parts.Select(p => (object?)p).ToList();
    }

    private static string Replace(string s, string old, string replacement, long count)
    {
        if (count < 0) return old.Length == 0 ? string.Join(replacement, Py.Iterate(s).Prepend("").Append("").Cast<string>()) : s.Replace(old, replacement, StringComparison.Ordinal);
        var sb = new StringBuilder();
        int pos = 0;
        for (long n = 0; n < count; n++)
        {
            int i = s.IndexOf(old, pos, StringComparison.Ordinal);
            if (i < 0 || old.Length == 0) break;
            sb.Append(s, pos, i - pos).Append(replacement);
            pos = i + old.Length;
        }
        return sb.Append(s, pos, s.Length - pos).ToString();
    }

    private static int CountOf(string s, string sub)
    {
        if (sub.Length == 0) return s.Length + 1;
        int n = 0;
        for (int i = s.IndexOf(sub, StringComparison.Ordinal); i >= 0; i = s.IndexOf(sub, i + sub.Length, StringComparison.Ordinal)) n++;
        return n;
    }

    /// <summary>Python's str.title(): upper-case the first letter of every run of letters, lower-case the rest.</summary>
    public static string Title(string s)
    {
        var sb = new StringBuilder(s.Length);
        bool previousCased = false;
        foreach (char c in s)
        {
            sb.Append(previousCased ? char.ToLowerInvariant(c) : char.ToUpperInvariant(c));
            previousCased = char.IsLetter(c);
        }
        return sb.ToString();
    }
}
