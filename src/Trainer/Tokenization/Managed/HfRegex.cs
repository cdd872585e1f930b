using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace QLora.Trainer;

/// <summary>
/// A pre-tokenizer or normalizer regex of tokenizer.json, run with .NET's engine but with Oniguruma's view of the text
/// (what Hugging Face tokenizers runs): one character per code point. .NET matches UTF-16 units, so a character outside
/// the BMP (an emoji, a CJK extension ideograph, a math letter) would be two surrogates that are neither \p{L} nor \p{N};
/// such text is matched on a shadow string where each of those characters is one BMP stand-in of the same Unicode
/// general category, and the match positions are mapped back.
/// </summary>
internal sealed class HfRegex
{
    private static readonly char[] StandIns = BuildStandIns();
    private readonly Regex _regex;

    public HfRegex(string pattern, string source)
    {
        try
        {
            _regex = new Regex(pattern, RegexOptions.CultureInvariant | RegexOptions.Compiled);
        }
        catch (ArgumentException e)
        {
            throw new InvalidDataException($"{source}: the regex '{pattern}' of tokenizer.json is not one .NET can run: {e.Message}", e);
        }
    }

    /// <summary>A regex matching <paramref name="literal"/> (a Split or Replace with a String pattern).</summary>
    public static HfRegex Literal(string literal, string source) => new(Regex.Escape(literal), source);

    /// <summary>The non-empty matches of the regex in <paramref name="text"/>, left to right, as (start, end) UTF-16 indices.</summary>
    public List<(int Start, int End)> Matches(string text)
    {
        var result = new List<(int, int)>();
        if (text.Length == 0)
            return result;
        if (!HasSurrogates(text))
        {
            foreach (var m in _regex.EnumerateMatches(text))
            {
                if (m.Length > 0)
                    result.Add((m.Index, m.Index + m.Length));
            }
            return result;
        }
        // Shadow: one char per code point; starts[k] = index in text of the k-th code point (starts[n] = text.Length).
        var shadow = new StringBuilder(text.Length);
        var starts = new List<int>(text.Length + 1);
        for (int i = 0; i < text.Length;)
        {
            starts.Add(i);
            if (char.IsHighSurrogate(text[i]) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1]))
            {
                int cp = char.ConvertToUtf32(text[i], text[i + 1]);
                shadow.Append(StandIns[(int)CharUnicodeInfo.GetUnicodeCategory(cp)]);
                i += 2;
            }
            else
            {
                shadow.Append(text[i]);
                i++;
            }
        }
        starts.Add(text.Length);
        foreach (var m in _regex.EnumerateMatches(shadow.ToString()))
        {
            if (m.Length > 0)
                result.Add((starts[m.Index], starts[m.Index + m.Length]));
        }
        return result;
    }

    /// <summary><paramref name="text"/> with every match replaced by <paramref name="content"/> (taken literally).</summary>
    public string Replace(string text, string content)
    {
        var matches = Matches(text);
        if (matches.Count == 0)
            return text;
        var sb = new StringBuilder(text.Length);
        int last = 0;
        foreach (var (start, end) in matches)
        {
            sb.Append(text, last, start - last).Append(content);
            last = end;
        }
        return sb.Append(text, last, text.Length - last).ToString();
    }

    private static bool HasSurrogates(string text)
    {
        foreach (var c in text)
        {
            if (char.IsSurrogate(c))
                return true;
        }
        return false;
    }

    // For each general category, a BMP character of that category above U+00FF (so it is never an ASCII literal of a
    // pattern, nor whitespace, nor a case variant of one): the stand-in for astral characters of that category.
    private static char[] BuildStandIns()
    {
        var standIns = new char[32];
        Array.Fill(standIns, '\uFFFF');
        var found = new bool[32];
        for (int c = 0x100; c < 0xFFFE; c++)
        {
            var cat = (int)CharUnicodeInfo.GetUnicodeCategory((char)c);
            if (cat == (int)UnicodeCategory.Surrogate || found[cat] || char.IsWhiteSpace((char)c))
                continue;
            found[cat] = true;
            standIns[cat] = (char)c;
        }
        return standIns;
    }
}
