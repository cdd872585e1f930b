using System.Globalization;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>One entry of tokenizer.json's added_tokens, with the flags Hugging Face tokenizers matches it by.</summary>
internal sealed record AddedToken(int Id, string Content, bool Special, bool SingleWord, bool LStrip, bool RStrip, bool Normalized);

/// <summary>
/// Cuts the added tokens (specials such as &lt;|eot_id|&gt;, and any user-added words) out of the text before the model
/// runs, as tokenizers' AddedVocabulary.extract_and_normalize: first the tokens with normalized=false on the raw text,
/// then each remaining stretch is normalized and the tokens with normalized=true are found in it (their own content
/// normalized the same way). Matching is leftmost-longest and non-overlapping; single_word, lstrip and rstrip act as there.
/// </summary>
internal sealed class AddedTokens
{
    private readonly Matcher _raw;
    private readonly Matcher _normalized;
    private readonly TokenizerNormalizer? _normalizer;

    public AddedTokens(IReadOnlyList<AddedToken> tokens, TokenizerNormalizer? normalizer)
    {
        _normalizer = normalizer;
        _raw = new Matcher(tokens.Where(t => !t.Normalized).Select(t => (t.Content, t)));
        _normalized = new Matcher(tokens.Where(t => t.Normalized).Select(t => (normalizer?.Normalize(t.Content) ?? t.Content, t)));
    }

    /// <summary>Reads tokenizer.json's added_tokens; an entry without "normalized" takes !special, as tokenizers does.</summary>
    public static List<AddedToken> Read(JsonNode? node, string source)
    {
        var list = new List<AddedToken>();
        if (node is null)
            return list;
        if (node is not JsonArray array)
            throw new InvalidDataException($"{source}: tokenizer.json's added_tokens is not a list.");
        foreach (var item in array)
        {
            if (item is not JsonObject o || o["id"] is not JsonValue idValue || !idValue.TryGetValue<int>(out var id))
                throw new InvalidDataException($"{source}: an entry of tokenizer.json's added_tokens has no integer \"id\".");
            var content = TokenizerJson.String(o, "content", "added_tokens entry", source);
            bool special = TokenizerJson.Bool(o, "special", false);
            list.Add(new AddedToken(id, content, special, TokenizerJson.Bool(o, "single_word", false), TokenizerJson.Bool(o, "lstrip", false),
                TokenizerJson.Bool(o, "rstrip", false), TokenizerJson.Bool(o, "normalized", !special)));
        }
        return list;
    }

    /// <summary>
    /// The text as pieces: each either an added token's id, or normalized text for the pre-tokenizer and model (with
    /// whether it starts at the start of the input). Empty pieces are dropped.
    /// </summary>
    public void Split(string text, List<(TextPiece Piece, int TokenId)> output)
    {
        foreach (var (start, end, token) in _raw.Find(text))
        {
            if (token is not null)
            {
                output.Add((default, token.Id));
                continue;
            }
            var part = text[start..end];
            if (_normalizer is not null)
                part = _normalizer.Normalize(part);
            foreach (var (s, e, t) in _normalized.Find(part))
            {
                if (t is not null)
                    output.Add((default, t.Id));
                else if (e > s)
                    output.Add((new TextPiece(s == 0 && e == part.Length ? part : part[s..e], start == 0 && s == 0), -1));
            }
        }
    }

    private sealed class Matcher
    {
        // Patterns by first character, longest first (leftmost-longest: at the first position where any matches, the longest wins).
        private readonly Dictionary<char, (string Pattern, AddedToken Token)[]> _byFirstChar;
        private readonly System.Buffers.SearchValues<char>? _firstChars;

        public Matcher(IEnumerable<(string Pattern, AddedToken Token)> patterns)
        {
            _byFirstChar = patterns.Where(p => p.Pattern.Length > 0)
                .GroupBy(p => p.Pattern[0])
                .ToDictionary(g => g.Key, g => g.OrderByDescending(p => p.Pattern.Length).ToArray());
            _firstChars = _byFirstChar.Count > 0 ? System.Buffers.SearchValues.Create([.. _byFirstChar.Keys]) : null;
        }

        /// <summary>tokenizers' find_matches: the whole text as (start, end, token or null) runs; non-token runs may be empty only when the text is.</summary>
        public List<(int Start, int End, AddedToken? Token)> Find(string sentence)
        {
            var splits = new List<(int, int, AddedToken?)>();
            int startOffset = 0;
            if (_firstChars is not null)
            {
                int pos = 0;
                while (pos < sentence.Length)
                {
                    int at = sentence.AsSpan(pos).IndexOfAny(_firstChars);
                    if (at < 0)
                        break;
                    at += pos;
                    AddedToken? found = null;
                    int length = 0;
                    foreach (var (pattern, token) in _byFirstChar[sentence[at]])
                    {
                        if (string.CompareOrdinal(sentence, at, pattern, 0, pattern.Length) == 0 && at + pattern.Length <= sentence.Length)
                        {
                            (found, length) = (token, pattern.Length);
                            break;
                        }
                    }
                    if (found is null)
                    {
                        pos = at + 1;
                        continue;
                    }
                    int start = at, stop = at + length;
                    pos = stop; // the search resumes after the match itself, whatever stripping does below
                    if (found.SingleWord)
                    {
                        bool startSpace = start == 0 || !IsWordChar(sentence, start, before: true);
                        bool stopSpace = stop == sentence.Length || !IsWordChar(sentence, stop, before: false);
                        if (!startSpace || !stopSpace)
                            continue;
                    }
                    if (found.LStrip)
                    {
                        int newStart = start;
                        while (newStart > 0 && char.IsWhiteSpace(sentence[newStart - 1]))
                            newStart--;
                        start = Math.Max(newStart, startOffset);
                    }
                    if (found.RStrip)
                    {
                        while (stop < sentence.Length && char.IsWhiteSpace(sentence[stop]))
                            stop++;
                    }
                    if (startOffset < start)
                        splits.Add((startOffset, start, null));
                    splits.Add((start, stop, found));
                    startOffset = stop;
                }
            }
            if (startOffset != sentence.Length || sentence.Length == 0)
                splits.Add((startOffset, sentence.Length, null));
            return splits;
        }

        // Rust regex's \w: alphabetic, marks, decimal digits, connector punctuation (Join_Control aside).
        private static bool IsWordChar(string s, int index, bool before)
        {
            int cp;
            if (before)
                cp = index >= 2 && char.IsSurrogatePair(s[index - 2], s[index - 1]) ? char.ConvertToUtf32(s[index - 2], s[index - 1]) : s[index - 1];
            else
                cp = char.IsSurrogatePair(s, index) ? char.ConvertToUtf32(s[index], s[index + 1]) : s[index];
            return CharUnicodeInfo.GetUnicodeCategory(cp) is UnicodeCategory.UppercaseLetter or UnicodeCategory.LowercaseLetter
                or UnicodeCategory.TitlecaseLetter or UnicodeCategory.ModifierLetter or UnicodeCategory.OtherLetter
                or UnicodeCategory.NonSpacingMark or UnicodeCategory.SpacingCombiningMark or UnicodeCategory.EnclosingMark
                or UnicodeCategory.DecimalDigitNumber or UnicodeCategory.LetterNumber or UnicodeCategory.ConnectorPunctuation;
        }
    }
}
