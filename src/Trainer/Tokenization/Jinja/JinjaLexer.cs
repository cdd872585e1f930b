using System.Globalization;
using System.Text;

namespace QLora.Trainer;

/// <summary>The kinds of token inside a Jinja tag.</summary>
internal enum JinjaTokenKind { Name, String, Integer, Float, Operator, End }

/// <summary>One token of a tag's expression: its kind, text (the unescaped value for strings) and source line.</summary>
internal readonly record struct JinjaToken(JinjaTokenKind Kind, string Text, int Line)
{
    public bool Is(string op) => (Kind == JinjaTokenKind.Operator || Kind == JinjaTokenKind.Name) && Text == op;

    public override string ToString() => Kind == JinjaTokenKind.End ? "end of tag" : $"'{Text}'";
}

/// <summary>A piece of a template: literal text, an output tag <c>{{ }}</c> or a statement tag <c>{% %}</c> (comments are dropped).</summary>
internal sealed record JinjaSegment(JinjaSegmentKind Kind, string Text, List<JinjaToken> Tokens, int Line);

internal enum JinjaSegmentKind { Text, Output, Statement }

/// <summary>
/// Splits a template into text and tags with the whitespace rules transformers compiles chat templates with:
/// <c>trim_blocks</c> (the newline after a statement or comment tag is dropped), <c>lstrip_blocks</c> (spaces and tabs
/// between a line's start and a statement or comment tag are dropped), and the <c>-</c> / <c>+</c> modifiers.
/// </summary>
internal static class JinjaLexer
{
    private static readonly string[] Operators = ["//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|"];

    public static List<JinjaSegment> Split(string source)
    {
        var segments = new List<JinjaSegment>();
        int pos = 0;
        bool stripNext = false, lineStarting = true;
        while (pos <= source.Length)
        {
            int tag = NextTag(source, pos);
            string text = source[pos..(tag < 0 ? source.Length : tag)];
            if (stripNext)
                text = text.TrimStart();
            if (tag < 0)
            {
                if (text.Length > 0) segments.Add(new JinjaSegment(JinjaSegmentKind.Text, text, [], LineAt(source, pos)));
                break;
            }
            char kind = source[tag + 1];
            int bodyStart = tag + 2;
            char control = bodyStart < source.Length ? source[bodyStart] : '\0';
            if (control is '-' or '+')
                bodyStart++;
            if (control == '-')
            {
                text = text.TrimEnd();
            }
            else if (control != '+' && kind != '{')
            {
                int lineStart = text.LastIndexOf('\n') + 1;
                if ((lineStart > 0 || lineStarting) && lineStart < text.Length && text.AsSpan(lineStart).Trim().IsEmpty)
                    text = text[..lineStart];
            }
            if (text.Length > 0) segments.Add(new JinjaSegment(JinjaSegmentKind.Text, text, [], LineAt(source, pos)));

            int line = LineAt(source, tag);
            int end;
            bool trimAfter;
            if (kind == '#')
            {
                int close = source.IndexOf("#}", bodyStart, StringComparison.Ordinal);
                if (close < 0) throw new JinjaTemplateException($"Line {line}: a comment {{# is never closed with #}}.");
                trimAfter = close > bodyStart && source[close - 1] == '-';
                bool keep = close > bodyStart && source[close - 1] == '+';
                end = close + 2;
                if (!trimAfter && !keep) end = SkipNewline(source, end);
            }
            else
            {
                var tokens = new List<JinjaToken>();
                (end, trimAfter) = Tokenize(source, bodyStart, kind == '{' ? "}}" : "%}", tokens, line);
                if (kind == '%' && !trimAfter && source[end - 3] != '+')
                    end = SkipNewline(source, end);
                segments.Add(new JinjaSegment(kind == '{' ? JinjaSegmentKind.Output : JinjaSegmentKind.Statement, "", tokens, line));
            }
            stripNext = trimAfter;
            lineStarting = end > 0 && source[end - 1] == '\n';
            pos = end;
        }
        return segments;
    }

    private static int SkipNewline(string s, int i) =>
        i < s.Length && s[i] == '\n' ? i + 1 : i + 1 < s.Length && s[i] == '\r' && s[i + 1] == '\n' ? i + 2 : i;

    private static int NextTag(string s, int from)
    {
        for (int i = s.IndexOf('{', from); i >= 0 && i + 1 < s.Length; i = s.IndexOf('{', i + 1))
        {
            if (s[i + 1] is '{' or '%' or '#')
                return i;
        }
        return -1;
    }

    private static int LineAt(string s, int index)
    {
        int line = 1;
        for (int i = 0; i < index && i < s.Length; i++)
            if (s[i] == '\n') line++;
        return line;
    }

    // Reads expression tokens up to the closing delimiter; returns the index after it and whether it was "-}}" / "-%}".
    private static (int End, bool TrimAfter) Tokenize(string s, int i, string close, List<JinjaToken> tokens, int line)
    {
        while (true)
        {
            while (i < s.Length && char.IsWhiteSpace(s[i]))
            {
                if (s[i] == '\n') line++;
                i++;
            }
            if (i >= s.Length)
                throw new JinjaTemplateException($"Line {line}: a tag is never closed with {close}.");
            if (s[i] == '-' && string.CompareOrdinal(s, i + 1, close, 0, 2) == 0)
                return (i + 3, true);
            if (s[i] == '+' && close == "%}" && string.CompareOrdinal(s, i + 1, close, 0, 2) == 0)
                return (i + 3, false);
            if (string.CompareOrdinal(s, i, close, 0, 2) == 0)
                return (i + 2, false);
            char c = s[i];
            if (char.IsLetter(c) || c == '_')
            {
                int start = i;
                while (i < s.Length && (char.IsLetterOrDigit(s[i]) || s[i] == '_')) i++;
                tokens.Add(new JinjaToken(JinjaTokenKind.Name, s[start..i], line));
            }
            else if (char.IsAsciiDigit(c))
            {
                int start = i;
                while (i < s.Length && (char.IsAsciiDigit(s[i]) || s[i] == '_')) i++;
                bool isFloat = false;
                if (i + 1 < s.Length && s[i] == '.' && char.IsAsciiDigit(s[i + 1]))
                {
                    isFloat = true;
                    i++;
                    while (i < s.Length && (char.IsAsciiDigit(s[i]) || s[i] == '_')) i++;
                }
                if (i < s.Length && s[i] is 'e' or 'E')
                {
                    int j = i + 1;
                    if (j < s.Length && s[j] is '+' or '-') j++;
                    if (j < s.Length && char.IsAsciiDigit(s[j]))
                    {
                        isFloat = true;
                        i = j;
                        while (i < s.Length && char.IsAsciiDigit(s[i])) i++;
                    }
                }
                tokens.Add(new JinjaToken(isFloat ? JinjaTokenKind.Float : JinjaTokenKind.Integer, s[start..i].Replace("_", ""), line));
            }
            else if (c is '\'' or '"')
            {
                var sb = new StringBuilder();
                i++;
                while (true)
                {
                    if (i >= s.Length) throw new JinjaTemplateException($"Line {line}: a string literal is never closed.");
                    char d = s[i];
                    if (d == c) { i++; break; }
                    if (d == '\\' && i + 1 < s.Length)
                    {
                        i = Unescape(s, i + 1, sb);
                        continue;
                    }
                    if (d == '\n') line++;
                    sb.Append(d);
                    i++;
                }
                tokens.Add(new JinjaToken(JinjaTokenKind.String, sb.ToString(), line));
            }
            else
            {
                string? op = null;
                foreach (var o in Operators)
                {
                    if (string.CompareOrdinal(s, i, o, 0, o.Length) == 0) { op = o; break; }
                }
                if (op is null)
                    throw new JinjaTemplateException($"Line {line}: unexpected character '{c}' in a tag.");
                tokens.Add(new JinjaToken(JinjaTokenKind.Operator, op, line));
                i += op.Length;
            }
        }
    }

    // Python's unicode-escape rules for a backslash sequence starting at s[i] (just after the backslash).
    private static int Unescape(string s, int i, StringBuilder sb)
    {
        char e = s[i];
        switch (e)
        {
            case 'n': sb.Append('\n'); return i + 1;
            case 't': sb.Append('\t'); return i + 1;
            case 'r': sb.Append('\r'); return i + 1;
            case '\\': sb.Append('\\'); return i + 1;
            case '\'': sb.Append('\''); return i + 1;
            case '"': sb.Append('"'); return i + 1;
            case 'a': sb.Append('\a'); return i + 1;
            case 'b': sb.Append('\b'); return i + 1;
            case 'f': sb.Append('\f'); return i + 1;
            case 'v': sb.Append('\v'); return i + 1;
            case '\n': return i + 1;
            case 'x' or 'u' or 'U':
                int n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                if (i + n < s.Length + 0 && int.TryParse(s.AsSpan(i + 1, Math.Min(n, s.Length - i - 1)), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int code) && i + n < s.Length)
                {
                    sb.Append(char.ConvertFromUtf32(code));
                    return i + 1 + n;
                }
                break;
            default:
                if (e is >= '0' and <= '7')
                {
                    int j = i, v = 0;
                    while (j < s.Length && j < i + 3 && s[j] is >= '0' and <= '7') v = v * 8 + (s[j++] - '0');
                    sb.Append((char)v);
                    return j;
                }
                break;
        }
        sb.Append('\\').Append(e);
        return i + 1;
    }
}
