using System.Globalization;
using System.Text;

namespace QLora.Trainer;

/// <summary>
/// The functions transformers puts in a chat template's environment: <c>raise_exception</c>, <c>strftime_now</c> (here
/// with the clock as an input, so a render is reproducible), plus Jinja's <c>namespace</c>, <c>range</c> and <c>dict</c>.
/// </summary>
internal sealed class JinjaGlobals
{
    private readonly Dictionary<string, object?> _functions;

    public JinjaGlobals(DateTime now)
    {
        _functions = new(StringComparer.Ordinal)
        {
            ["raise_exception"] = new JinjaCallable("raise_exception", (a, _) =>
                throw new JinjaRaisedException(a.Count > 0 ? Py.Str(a[0]) : "raise_exception() was called.")),
            ["strftime_now"] = new JinjaCallable("strftime_now", (a, _) =>
                Strftime(now, a.Count == 1 && a[0] is string f ? f : throw new JinjaTemplateException("strftime_now takes one format string."))),
            ["namespace"] = new JinjaCallable("namespace", (a, k) =>
            {
                var ns = new JinjaNamespace();
                foreach (var x in a)
                {
                    if (x is not OrderedDictionary<string, object?> d) throw new JinjaTemplateException("namespace() takes keyword arguments or a dict.");
                    foreach (var kv in d) ns.Attributes[kv.Key] = kv.Value;
                }
                foreach (var kv in k) ns.Attributes[kv.Key] = kv.Value;
                return ns;
            }),
            ["range"] = new JinjaCallable("range", (a, _) =>
            {
                long start = 0, stop, step = 1;
                if (a.Count == 1) stop = Py.ToLong(a[0]);
                else if (a.Count is 2 or 3) { start = Py.ToLong(a[0]); stop = Py.ToLong(a[1]); if (a.Count == 3) step = Py.ToLong(a[2]); }
                else throw new JinjaTemplateException("range() takes 1 to 3 arguments.");
                if (step == 0) throw new JinjaTemplateException("range() step must not be zero.");
                var list = new List<object?>();
                for (long i = start; step > 0 ? i < stop : i > stop; i += step) list.Add(i);
                return list;
            }),
            ["dict"] = new JinjaCallable("dict", (a, k) =>
            {
                var d = new OrderedDictionary<string, object?>(StringComparer.Ordinal);
                foreach (var kv in k) d[kv.Key] = kv.Value;
                return d;
            }),
        };
    }

    public bool TryGet(string name, out object? value) => _functions.TryGetValue(name, out value);

    /// <summary>Python's datetime.strftime for the directives chat templates use (C locale names).</summary>
    public static string Strftime(DateTime t, string format)
    {
        var c = CultureInfo.InvariantCulture;
        var sb = new StringBuilder();
        for (int i = 0; i < format.Length; i++)
        {
            if (format[i] != '%' || i + 1 == format.Length)
            {
                sb.Append(format[i]);
                continue;
            }
            char d = format[++i];
            sb.Append(d switch
            {
                'd' => t.Day.ToString("00", c),
                'm' => t.Month.ToString("00", c),
                'Y' => t.Year.ToString("0000", c),
                'y' => (t.Year % 100).ToString("00", c),
                'b' or 'h' => t.ToString("MMM", c),
                'B' => t.ToString("MMMM", c),
                'a' => t.ToString("ddd", c),
                'A' => t.ToString("dddd", c),
                'H' => t.Hour.ToString("00", c),
                'I' => (t.Hour % 12 == 0 ? 12 : t.Hour % 12).ToString("00", c),
                'M' => t.Minute.ToString("00", c),
                'S' => t.Second.ToString("00", c),
                'p' => t.Hour < 12 ? "AM" : "PM",
                'j' => t.DayOfYear.ToString("000", c),
                'e' => t.Day.ToString(c).PadLeft(2),
                'F' => t.ToString("yyyy-MM-dd", c),
                'D' => t.ToString("MM/dd/yy", c),
                'T' => t.ToString("HH:mm:ss", c),
                'w' => ((int)t.DayOfWeek).ToString(c),
                '%' => "%",
                _ => throw new JinjaNotSupportedException($"strftime directive '%{d}'", $"strftime_now: the directive %{d} is not supported."),
            });
        }
        return sb.ToString();
    }
}
