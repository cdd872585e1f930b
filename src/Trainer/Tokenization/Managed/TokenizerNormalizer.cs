using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// A normalizer of tokenizer.json (NFC/NFD/NFKC/NFKD, Lowercase, Prepend, Replace, Strip, ByteLevel, Sequence), applied
/// as Hugging Face tokenizers applies it to each stretch of text between added tokens.
/// </summary>
internal abstract class TokenizerNormalizer
{
    public abstract string Normalize(string text);

    /// <summary>The normalizer a tokenizer.json "normalizer" section describes, or null for none.</summary>
    public static TokenizerNormalizer? From(JsonNode? node, string source)
    {
        if (node is null)
            return null;
        if (node is not JsonObject o)
            throw new InvalidDataException($"{source}: tokenizer.json's normalizer is not an object.");
        var type = TokenizerJson.Type(o, "normalizer", source);
        return type switch
        {
            "NFC" => new Unicode(NormalizationForm.FormC),
            "NFD" => new Unicode(NormalizationForm.FormD),
            "NFKC" => new Unicode(NormalizationForm.FormKC),
            "NFKD" => new Unicode(NormalizationForm.FormKD),
            "Lowercase" => new Lowercase(),
            "Prepend" => new Prepend(TokenizerJson.String(o, "prepend", "Prepend normalizer", source)),
            "Replace" => new Replace(TokenizerJson.Pattern(o, "Replace normalizer", source), TokenizerJson.String(o, "content", "Replace normalizer", source)),
            "Strip" => new Strip(TokenizerJson.Bool(o, "strip_left", true), TokenizerJson.Bool(o, "strip_right", true)),
            "ByteLevel" => new ByteLevel(),
            "Sequence" => new Sequence((o["normalizers"] as JsonArray ?? throw new InvalidDataException($"{source}: tokenizer.json's Sequence normalizer has no \"normalizers\" list."))
                .Select(n => From(n, source)).OfType<TokenizerNormalizer>().ToArray()),
            _ => throw TokenizerJson.Unsupported("normalizer", type, source),
        };
    }

    private sealed class Unicode(NormalizationForm form) : TokenizerNormalizer
    {
        public override string Normalize(string text) => UnicodeNormalizer.Normalize(text, form);
    }

    // Rust's char::to_lowercase, one character at a time: the simple mapping, except U+0130 (İ), the one character whose
    // unconditional full lowercase is two characters.
    private sealed class Lowercase : TokenizerNormalizer
    {
        public override string Normalize(string text)
        {
            var lower = text.ToLowerInvariant();
            return text.Contains('\u0130') ? ExpandDottedCapitalI(text, lower) : lower;
        }

        private static string ExpandDottedCapitalI(string original, string lower)
        {
            var sb = new StringBuilder(lower.Length + 4);
            for (int i = 0; i < original.Length; i++)
            {
                if (original[i] == '\u0130')
                    sb.Append("i\u0307");
                else
                    sb.Append(lower[i]);
            }
            return sb.ToString();
        }
    }

    private sealed class Prepend(string prefix) : TokenizerNormalizer
    {
        public override string Normalize(string text) => text.Length == 0 ? text : prefix + text;
    }

    private sealed class Replace(HfRegex pattern, string content) : TokenizerNormalizer
    {
        public override string Normalize(string text) => pattern.Replace(text, content);
    }

    // Rust's char::is_whitespace and .NET's char.IsWhiteSpace name the same characters (Unicode White_Space).
    private sealed class Strip(bool left, bool right) : TokenizerNormalizer
    {
        public override string Normalize(string text) => (left, right) switch
        {
            (true, true) => text.Trim(),
            (true, false) => text.TrimStart(),
            (false, true) => text.TrimEnd(),
            _ => text,
        };
    }

    private sealed class ByteLevel : TokenizerNormalizer
    {
        public override string Normalize(string text) => ByteLevelAlphabet.Map(text);
    }

    private sealed class Sequence(TokenizerNormalizer[] steps) : TokenizerNormalizer
    {
        public override string Normalize(string text)
        {
            foreach (var step in steps)
                text = step.Normalize(text);
            return text;
        }
    }
}
