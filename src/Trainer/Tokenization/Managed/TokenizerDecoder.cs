using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// A decoder of tokenizer.json (ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, BPEDecoder, Sequence): turns
/// token strings back into text as tokenizers' decode_chain does, the results then joined.
/// </summary>
internal abstract class TokenizerDecoder
{
    public abstract List<string> DecodeChain(List<string> tokens);

    /// <summary>The decoder a tokenizer.json "decoder" section describes, or null for none (tokens joined by spaces).</summary>
    public static TokenizerDecoder? From(JsonNode? node, string source)
    {
        if (node is null)
            return null;
        if (node is not JsonObject o)
            throw new InvalidDataException($"{source}: tokenizer.json's decoder is not an object.");
        var type = TokenizerJson.Type(o, "decoder", source);
        return type switch
        {
            "ByteLevel" => new ByteLevel(),
            "Metaspace" => Metaspace(o, source),
            "Replace" => new Replace(TokenizerJson.Pattern(o, "Replace decoder", source), TokenizerJson.String(o, "content", "Replace decoder", source)),
            "ByteFallback" => new ByteFallback(),
            "Fuse" => new Fuse(),
            "Strip" => Strip(o, source),
            "BPEDecoder" => new BpeSuffix(TokenizerJson.OptionalString(o, "suffix") ?? "</w>"),
            "Sequence" => new Sequence((o["decoders"] as JsonArray ?? throw new InvalidDataException($"{source}: tokenizer.json's Sequence decoder has no \"decoders\" list."))
                .Select(n => From(n, source)).OfType<TokenizerDecoder>().ToArray()),
            _ => throw TokenizerJson.Unsupported("decoder", type, source),
        };
    }

    private static TokenizerDecoder Metaspace(JsonObject o, string source)
    {
        var rep = TokenizerJson.String(o, "replacement", "Metaspace decoder", source);
        if (rep.Length != 1)
            throw new InvalidDataException($"{source}: tokenizer.json's Metaspace replacement '{rep}' is not one character.");
        bool prepends = TokenizerJson.OptionalString(o, "prepend_scheme") is { } scheme ? scheme != "never" : TokenizerJson.Bool(o, "add_prefix_space", true);
        return new MetaspaceDecoder(rep[0], prepends);
    }

    private static TokenizerDecoder Strip(JsonObject o, string source)
    {
        var content = TokenizerJson.String(o, "content", "Strip decoder", source);
        if (content.Length != 1)
            throw new InvalidDataException($"{source}: tokenizer.json's Strip decoder content '{content}' is not one character.");
        return new StripDecoder(content[0], TokenizerJson.Int(o, "start", 0), TokenizerJson.Int(o, "stop", 0));
    }

    /// <summary>Each token's characters read back as bytes (a token with a character outside the alphabet is taken as its own UTF-8), then decoded with U+FFFD for invalid sequences.</summary>
    private sealed class ByteLevel : TokenizerDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            var bytes = new List<byte>();
            foreach (var t in tokens)
            {
                bool mapped = true;
                foreach (var ch in t)
                {
                    if (ByteLevelAlphabet.ByteOf(ch) < 0)
                    {
                        mapped = false;
                        break;
                    }
                }
                if (mapped)
                {
                    foreach (var ch in t)
                        bytes.Add((byte)ByteLevelAlphabet.ByteOf(ch));
                }
                else
                    bytes.AddRange(Encoding.UTF8.GetBytes(t));
            }
            return [Encoding.UTF8.GetString(bytes.ToArray())];
        }
    }

    // The replacement becomes a space, except in the first token when a prefix space was prepended: there it is dropped.
    private sealed class MetaspaceDecoder(char replacement, bool prepends) : TokenizerDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            var result = new List<string>(tokens.Count);
            for (int i = 0; i < tokens.Count; i++)
                result.Add(i == 0 && prepends ? tokens[i].Replace(replacement.ToString(), "", StringComparison.Ordinal) : tokens[i].Replace(replacement, ' '));
            return result;
        }
    }

    private sealed class Replace(HfRegex pattern, string content) : TokenizerDecoder
    {
        public override List<string> DecodeChain(List<string> tokens) => tokens.ConvertAll(t => pattern.Replace(t, content));
    }

    /// <summary>Runs of &lt;0xNN&gt; tokens become the text of their bytes, or one U+FFFD per byte when those bytes are not valid UTF-8.</summary>
    private sealed class ByteFallback : TokenizerDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            var result = new List<string>(tokens.Count);
            var pending = new List<byte>();
            void Flush()
            {
                if (pending.Count == 0)
                    return;
                var bytes = pending.ToArray();
                if (System.Text.Unicode.Utf8.IsValid(bytes))
                    result.Add(Encoding.UTF8.GetString(bytes));
                else
                {
                    for (int i = 0; i < bytes.Length; i++)
                        result.Add("\uFFFD");
                }
                pending.Clear();
            }
            foreach (var t in tokens)
            {
                if (t.Length == 6 && t.StartsWith("<0x", StringComparison.Ordinal) && t[5] == '>'
                    && byte.TryParse(t.AsSpan(3, 2), System.Globalization.NumberStyles.AllowHexSpecifier, null, out var b))
                    pending.Add(b);
                else
                {
                    Flush();
                    result.Add(t);
                }
            }
            Flush();
            return result;
        }
    }

    private sealed class Fuse : TokenizerDecoder
    {
        public override List<string> DecodeChain(List<string> tokens) => [string.Concat(tokens)];
    }

    // Up to `start` leading and `stop` trailing occurrences of one character removed from each token.
    private sealed class StripDecoder(char content, int start, int stop) : TokenizerDecoder
    {
        public override List<string> DecodeChain(List<string> tokens) => tokens.ConvertAll(t =>
        {
            int from = 0;
            while (from < start && from < t.Length && t[from] == content)
                from++;
            int to = t.Length;
            for (int i = 0; i < stop && to > from && t[to - 1] == content; i++)
                to--;
            return t[from..to];
        });
    }

    private sealed class BpeSuffix(string suffix) : TokenizerDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            var result = new List<string>(tokens.Count);
            for (int i = 0; i < tokens.Count; i++)
                result.Add(tokens[i].Replace(suffix, i == tokens.Count - 1 ? "" : " ", StringComparison.Ordinal));
            return result;
        }
    }

    private sealed class Sequence(TokenizerDecoder[] steps) : TokenizerDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            foreach (var step in steps)
                tokens = step.DecodeChain(tokens);
            return tokens;
        }
    }
}
