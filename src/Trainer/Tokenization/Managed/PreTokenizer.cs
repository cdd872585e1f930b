using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>A stretch of text on its way to the model, and whether it starts at the very start of the input (Metaspace's "first" scheme).</summary>
internal readonly record struct TextPiece(string Text, bool AtStart);

/// <summary>
/// A pre-tokenizer of tokenizer.json (ByteLevel, Split, Metaspace, Digits, Whitespace, WhitespaceSplit, Punctuation,
/// CharDelimiterSplit, BertPreTokenizer, Sequence): cuts a piece of text into the words the model sees, with Hugging
/// Face tokenizers' split behaviours (Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous). Empty pieces
/// are dropped, as PreTokenizedString.split drops them.
/// </summary>
internal abstract class PreTokenizer
{
    /// <summary>Appends the non-empty pieces <paramref name="piece"/> splits into.</summary>
    public abstract void Split(TextPiece piece, List<TextPiece> output);

    /// <summary>The pre-tokenizer a tokenizer.json "pre_tokenizer" section describes, or null for none.</summary>
    public static PreTokenizer? From(JsonNode? node, string source)
    {
        if (node is null)
            return null;
        if (node is not JsonObject o)
            throw new InvalidDataException($"{source}: tokenizer.json's pre_tokenizer is not an object.");
        var type = TokenizerJson.Type(o, "pre_tokenizer", source);
        return type switch
        {
            "ByteLevel" => new ByteLevel(TokenizerJson.Bool(o, "add_prefix_space", true), TokenizerJson.Bool(o, "use_regex", true), source),
            "Split" => new RegexSplit(TokenizerJson.Pattern(o, "Split pre_tokenizer", source),
                Behavior(TokenizerJson.String(o, "behavior", "Split pre_tokenizer", source), source), TokenizerJson.Bool(o, "invert", false)),
            "Metaspace" => Metaspace.From(o, source),
            "Digits" => new CharSplit(IsNumeric, TokenizerJson.Bool(o, "individual_digits", false) ? SplitBehavior.Isolated : SplitBehavior.Contiguous),
            "WhitespaceSplit" => new CharSplit(IsWhiteSpace, SplitBehavior.Removed),
            // \w+|[^\w\s]+ with Oniguruma's \w (letters, marks, decimal digits, connector punctuation).
            "Whitespace" => new RegexSplit(new HfRegex(@"[\p{L}\p{M}\p{Nd}\p{Pc}]+|[^\p{L}\p{M}\p{Nd}\p{Pc}\s]+", source), SplitBehavior.Removed, invert: true),
            "Punctuation" => new CharSplit(IsPunctuation, o["behavior"] is null ? SplitBehavior.Isolated : Behavior(TokenizerJson.String(o, "behavior", "Punctuation pre_tokenizer", source), source)),
            "CharDelimiterSplit" => Delimiter(o, source),
            "BertPreTokenizer" => new Sequence([new CharSplit(IsWhiteSpace, SplitBehavior.Removed), new CharSplit(IsPunctuation, SplitBehavior.Isolated)]),
            "Sequence" => new Sequence((o["pretokenizers"] as JsonArray ?? throw new InvalidDataException($"{source}: tokenizer.json's Sequence pre_tokenizer has no \"pretokenizers\" list."))
                .Select(n => From(n, source)).OfType<PreTokenizer>().ToArray()),
            _ => throw TokenizerJson.Unsupported("pre_tokenizer", type, source),
        };
    }

    private static PreTokenizer Delimiter(JsonObject o, string source)
    {
        var d = TokenizerJson.String(o, "delimiter", "CharDelimiterSplit pre_tokenizer", source);
        if (d.Length != 1)
            throw new InvalidDataException($"{source}: tokenizer.json's CharDelimiterSplit delimiter '{d}' is not one character.");
        return new CharSplit(cp => cp == d[0], SplitBehavior.Removed);
    }

    // Rust's char::is_whitespace: Unicode White_Space, all in the BMP, the same set as char.IsWhiteSpace.
    private static bool IsWhiteSpace(int cp) => cp <= 0xFFFF && char.IsWhiteSpace((char)cp);

    private static bool IsNumeric(int cp) => CharUnicodeInfo.GetUnicodeCategory(cp) is UnicodeCategory.DecimalDigitNumber or UnicodeCategory.LetterNumber or UnicodeCategory.OtherNumber;

    // Rust's is_ascii_punctuation or Unicode's P* categories, as tokenizers' Punctuation and BertPreTokenizer test it.
    private static bool IsPunctuation(int cp) => (cp is > 32 and < 127 && !char.IsAsciiLetterOrDigit((char)cp))
        || CharUnicodeInfo.GetUnicodeCategory(cp) is UnicodeCategory.ConnectorPunctuation or UnicodeCategory.DashPunctuation
            or UnicodeCategory.OpenPunctuation or UnicodeCategory.ClosePunctuation or UnicodeCategory.InitialQuotePunctuation
            or UnicodeCategory.FinalQuotePunctuation or UnicodeCategory.OtherPunctuation;

    private static SplitBehavior Behavior(string name, string source) => name switch
    {
        "Removed" => SplitBehavior.Removed,
        "Isolated" => SplitBehavior.Isolated,
        "MergedWithPrevious" => SplitBehavior.MergedWithPrevious,
        "MergedWithNext" => SplitBehavior.MergedWithNext,
        "Contiguous" => SplitBehavior.Contiguous,
        _ => throw new InvalidDataException($"{source}: tokenizer.json names the split behavior '{name}' (expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous)."),
    };

    internal enum SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous }

    /// <summary>
    /// NormalizedString.split: the text cut at <paramref name="matches"/> (sorted, non-overlapping, non-empty), the
    /// matches treated by <paramref name="behavior"/>; <paramref name="invert"/> swaps matches and the text between them.
    /// </summary>
    internal static void SplitAt(TextPiece piece, List<(int Start, int End)> matches, SplitBehavior behavior, bool invert, List<TextPiece> output)
    {
        var text = piece.Text;
        if (matches.Count == 0 && !invert && behavior != SplitBehavior.Removed)
        {
            if (text.Length > 0)
                output.Add(piece);
            return;
        }
        // The whole text as alternating (start, end, isMatch) runs.
        var runs = new List<(int Start, int End, bool IsMatch)>(matches.Count * 2 + 1);
        int prev = 0;
        foreach (var (s, e) in matches)
        {
            if (prev != s)
                runs.Add((prev, s, invert));
            runs.Add((s, e, !invert));
            prev = e;
        }
        if (prev != text.Length)
            runs.Add((prev, text.Length, invert));

        var parts = new List<(int Start, int End, bool Remove)>(runs.Count);
        switch (behavior)
        {
            case SplitBehavior.Isolated:
                foreach (var r in runs) parts.Add((r.Start, r.End, false));
                break;
            case SplitBehavior.Removed:
                foreach (var r in runs) parts.Add((r.Start, r.End, r.IsMatch));
                break;
            case SplitBehavior.Contiguous:
            {
                bool previousMatch = false;
                foreach (var r in runs)
                {
                    if (r.IsMatch == previousMatch && parts.Count > 0)
                        parts[^1] = (parts[^1].Start, r.End, false);
                    else
                        parts.Add((r.Start, r.End, false));
                    previousMatch = r.IsMatch;
                }
                break;
            }
            case SplitBehavior.MergedWithPrevious:
            {
                bool previousMatch = false;
                foreach (var r in runs)
                {
                    if (r.IsMatch && !previousMatch && parts.Count > 0)
                        parts[^1] = (parts[^1].Start, r.End, false);
                    else
                        parts.Add((r.Start, r.End, false));
                    previousMatch = r.IsMatch;
                }
                break;
            }
            case SplitBehavior.MergedWithNext:
            {
                bool previousMatch = false;
                for (int i = runs.Count - 1; i >= 0; i--)
                {
                    var r = runs[i];
                    if (r.IsMatch && !previousMatch && parts.Count > 0)
                        parts[^1] = (r.Start, parts[^1].End, false);
                    else
                        parts.Add((r.Start, r.End, false));
                    previousMatch = r.IsMatch;
                }
                parts.Reverse();
                break;
            }
        }
        foreach (var (s, e, remove) in parts)
        {
            if (!remove && e > s)
                output.Add(new TextPiece(s == 0 && e == text.Length ? text : text[s..e], piece.AtStart && s == 0));
        }
    }

    private sealed class RegexSplit(HfRegex regex, SplitBehavior behavior, bool invert) : PreTokenizer
    {
        public override void Split(TextPiece piece, List<TextPiece> output) => SplitAt(piece, regex.Matches(piece.Text), behavior, invert, output);
    }

    // A per-character pattern (Rust's Fn(char) -> bool): every matching code point is its own match.
    private sealed class CharSplit(Func<int, bool> isMatch, SplitBehavior behavior) : PreTokenizer
    {
        public override void Split(TextPiece piece, List<TextPiece> output)
        {
            var text = piece.Text;
            var matches = new List<(int, int)>();
            for (int i = 0; i < text.Length;)
            {
                int width = char.IsSurrogatePair(text, i) ? 2 : 1;
                int cp = width == 2 ? char.ConvertToUtf32(text[i], text[i + 1]) : text[i];
                if (isMatch(cp))
                    matches.Add((i, i + width));
                i += width;
            }
            SplitAt(piece, matches, behavior, invert: false, output);
        }
    }

    /// <summary>
    /// GPT-2's byte-level step: an optional leading space, the GPT-2 regex split (Isolated), then every piece written
    /// in the byte alphabet (UTF-8 bytes as characters).
    /// </summary>
    private sealed class ByteLevel(bool addPrefixSpace, bool useRegex, string source) : PreTokenizer
    {
        private readonly HfRegex? _regex = useRegex
            ? new HfRegex(@"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", source)
            : null;

        public override void Split(TextPiece piece, List<TextPiece> output)
        {
            if (addPrefixSpace && !piece.Text.StartsWith(' '))
                piece = piece with { Text = " " + piece.Text };
            if (_regex is null)
            {
                output.Add(piece with { Text = ByteLevelAlphabet.Map(piece.Text) });
                return;
            }
            int first = output.Count;
            SplitAt(piece, _regex.Matches(piece.Text), SplitBehavior.Isolated, invert: false, output);
            for (int i = first; i < output.Count; i++)
                output[i] = output[i] with { Text = ByteLevelAlphabet.Map(output[i].Text) };
        }
    }

    /// <summary>SentencePiece's whitespace handling: spaces become the replacement (▁), one is prepended, and the text is cut before each.</summary>
    private sealed class Metaspace(char replacement, Metaspace.Prepend scheme, bool split) : PreTokenizer
    {
        internal enum Prepend { Always, First, Never }

        public static Metaspace From(JsonObject o, string source)
        {
            var rep = TokenizerJson.String(o, "replacement", "Metaspace pre_tokenizer", source);
            if (rep.Length != 1)
                throw new InvalidDataException($"{source}: tokenizer.json's Metaspace replacement '{rep}' is not one character.");
            var scheme = TokenizerJson.OptionalString(o, "prepend_scheme") switch
            {
                "always" => Prepend.Always,
                "first" => Prepend.First,
                "never" => Prepend.Never,
                null => TokenizerJson.Bool(o, "add_prefix_space", true) ? Prepend.Always : Prepend.Never, // files older than prepend_scheme
                var other => throw new InvalidDataException($"{source}: tokenizer.json's Metaspace prepend_scheme '{other}' is not always, first or never."),
            };
            return new Metaspace(rep[0], scheme, TokenizerJson.Bool(o, "split", true));
        }

        public override void Split(TextPiece piece, List<TextPiece> output)
        {
            var text = piece.Text.Replace(' ', replacement);
            bool prepend = scheme switch
            {
                Prepend.Always => !text.StartsWith(replacement),
                Prepend.First => !text.StartsWith(replacement) && piece.AtStart,
                _ => false,
            };
            if (prepend)
                text = replacement + text;
            piece = piece with { Text = text };
            if (!split)
            {
                if (text.Length > 0)
                    output.Add(piece);
                return;
            }
            var matches = new List<(int, int)>();
            for (int i = 0; i < text.Length; i++)
            {
                if (text[i] == replacement)
                    matches.Add((i, i + 1));
            }
            SplitAt(piece, matches, SplitBehavior.MergedWithNext, invert: false, output);
        }
    }

    private sealed class Sequence(PreTokenizer[] steps) : PreTokenizer
    {
        public override void Split(TextPiece piece, List<TextPiece> output)
        {
            var current = new List<TextPiece> { piece };
            var next = new List<TextPiece>();
            foreach (var step in steps)
            {
                next.Clear();
                foreach (var p in current)
                    step.Split(p, next);
                (current, next) = (next, current);
            }
            output.AddRange(current);
        }
    }
}
