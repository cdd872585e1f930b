using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>Reading helpers for the sections of tokenizer.json, so every component reports a bad field the same way.</summary>
internal static class TokenizerJson
{
    public static string Type(JsonObject node, string section, string source) =>
        node["type"] is JsonValue v && v.TryGetValue<string>(out var s)
            ? s
            : throw new InvalidDataException($"{source}: tokenizer.json's {section} has no \"type\".");

    public static string String(JsonObject node, string key, string section, string source) =>
        node[key] is JsonValue v && v.TryGetValue<string>(out var s)
            ? s
            : throw new InvalidDataException($"{source}: tokenizer.json's {section} has no string \"{key}\".");

    public static string? OptionalString(JsonObject node, string key) =>
        node[key] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;

    public static bool Bool(JsonObject node, string key, bool fallback) =>
        node[key] is JsonValue v && v.TryGetValue<bool>(out var b) ? b : fallback;

    public static int Int(JsonObject node, string key, int fallback) =>
        node[key] is JsonValue v && v.TryGetValue<int>(out var i) ? i : fallback;

    /// <summary>A Split/Replace pattern: {"String": "..."} (taken literally) or {"Regex": "..."}.</summary>
    public static HfRegex Pattern(JsonObject node, string section, string source)
    {
        if (node["pattern"] is JsonObject p)
        {
            if (OptionalString(p, "String") is { } literal)
                return HfRegex.Literal(literal, source);
            if (OptionalString(p, "Regex") is { } regex)
                return new HfRegex(regex, source);
        }
        throw new InvalidDataException($"{source}: tokenizer.json's {section} has no pattern {{\"String\": ...}} or {{\"Regex\": ...}}.");
    }

    // Every component type Hugging Face tokenizers 0.22 knows, by section: one of these that the managed tokenizer lacks is
    // refused as not implemented; any other name is a malformed file.
    private static readonly Dictionary<string, string[]> Known = new()
    {
        ["normalizer"] = ["BertNormalizer", "Strip", "StripAccents", "NFC", "NFD", "NFKC", "NFKD", "Sequence", "Lowercase", "Nmt", "Precompiled", "Replace", "Prepend", "ByteLevel"],
        ["pre_tokenizer"] = ["BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Metaspace", "Whitespace", "Sequence", "Split", "Punctuation", "WhitespaceSplit", "Digits", "UnicodeScripts", "FixedLength"],
        ["post_processor"] = ["RobertaProcessing", "BertProcessing", "ByteLevel", "TemplateProcessing", "Sequence"],
        ["decoder"] = ["BPEDecoder", "ByteLevel", "WordPiece", "Metaspace", "CTC", "Sequence", "Replace", "Fuse", "Strip", "ByteFallback"],
        ["model"] = ["BPE", "WordPiece", "WordLevel", "Unigram"],
    };

    /// <summary>
    /// The error for a component type the managed tokenizer does not implement: <see cref="NotSupportedException"/> for
    /// one Hugging Face tokenizers has (the native library runs it), <see cref="InvalidDataException"/> for an unknown name.
    /// </summary>
    public static Exception Unsupported(string section, string type, string source) =>
        Known.TryGetValue(section, out var known) && known.Contains(type)
            ? new NotSupportedException(
                $"{source}: tokenizer.json's {section} is of type {type}, which the managed tokenizer does not implement " +
                "(it covers byte-level and SentencePiece-style BPE tokenizers: Llama 2/3, Mistral, Qwen2, GPT-2). " +
                $"On linux-x64 the native Hugging Face tokenizer runs it ({TokenizerSelection.EnvironmentVariable}=native or auto).")
            : new InvalidDataException($"{source}: tokenizer.json's {section} is of type '{type}', which is not a Hugging Face tokenizers {section} type.");
}
