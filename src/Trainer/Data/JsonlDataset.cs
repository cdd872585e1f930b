using System.Text.Json;

namespace QLora.Trainer;

/// <summary>
/// Reads JSONL datasets in the common shapes (plain text, Alpaca instruction, chat messages). A malformed line either
/// stops the read with a <see cref="DataFormatException"/> naming the file and line, or is skipped and counted.
/// </summary>
public static class JsonlDataset
{
    /// <summary>What a read produced.</summary>
    /// <param name="Samples">The valid samples, in file order.</param>
    /// <param name="SkippedLines">Malformed lines skipped (only when skipping was asked for).</param>
    /// <param name="FirstSkipped">The first skipped line's problem, for the log.</param>
    public sealed record Result(IReadOnlyList<TrainingSample> Samples, int SkippedLines, string? FirstSkipped);

    /// <summary>
    /// The longest line read (64 MiB): a hard stop for a file without line breaks. Text past what a sample of
    /// Data:MaxSeqLength tokens can use is cut before tokenizing (<see cref="SampleEncoder.MaxTextChars"/>), so a long
    /// line below this costs its bytes and its strings, not its tokenization.
    /// </summary>
    public const int DefaultMaxLineBytes = 64 << 20;

    /// <summary>
    /// Reads <paramref name="path"/>. <paramref name="format"/> is null for per-line detection, or the one format every
    /// line must have. Lines are decoded as strict UTF-8 (invalid bytes are a malformed line, reported as file:line),
    /// and a line longer than <paramref name="maxLineBytes"/> is a malformed line that is never held in memory whole.
    /// Each line is parsed in place from its UTF-8 bytes (a <see cref="JsonDocument"/> over the line's buffer: no copy,
    /// no UTF-16 line string), and only the sample's strings are kept.
    /// </summary>
    public static Result Read(string path, SampleFormat? format = null, bool skipMalformed = false, int maxLineBytes = DefaultMaxLineBytes)
    {
        var samples = new List<TrainingSample>();
        int skipped = 0;
        string? first = null;
        int lines = ForEachLine(path, maxLineBytes, (bytes, lineNo) => samples.Add(Parse(bytes, format, lineNo)), message =>
        {
            if (!skipMalformed) throw new DataFormatException(message + " (set Data:MalformedLines to skip to skip such lines)");
            skipped++;
            first ??= message;
        });
        if (samples.Count == 0) throw new DataFormatException($"{path}: no samples ({lines} lines, {skipped} malformed)");
        return new Result(samples, skipped, first);
    }

    /// <summary>
    /// The one line walker of every JSONL input: calls <paramref name="onLine"/> with each non-blank line's UTF-8 bytes
    /// (a leading BOM and a trailing CR removed; valid until the next line) and its 1-based number. A line that is not
    /// strict UTF-8 or is longer than <paramref name="maxLineBytes"/> (never held whole), or whose
    /// <paramref name="onLine"/> throws a JSON, format or invalid-operation error, goes to <paramref name="onMalformed"/>
    /// as "file:line: what is wrong". Returns the number of lines.
    /// </summary>
    public static int ForEachLine(string path, int maxLineBytes, Action<ReadOnlyMemory<byte>, int> onLine, Action<string> onMalformed)
    {
        if (Directory.Exists(path)) throw new IOException($"dataset {path} is a folder; a JSONL file is expected");
        if (!File.Exists(path)) throw new FileNotFoundException($"dataset {path} does not exist");
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxLineBytes);
        int lineNo = 0;
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1);
        var lines = new LineReader(stream, maxLineBytes);
        var utf8 = new System.Text.UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
        while (lines.Next(out var bytes, out bool tooLong))
        {
            lineNo++;
            try
            {
                if (tooLong) throw new FormatException($"the line is longer than {maxLineBytes:N0} bytes ({ByteSize.Format(maxLineBytes)}), the most one sample may take; is the file JSONL, one sample per line?");
                if (lineNo == 1 && bytes.Span.StartsWith("\uFEFF"u8)) bytes = bytes[3..];
                if (bytes.Length > 0 && bytes.Span[^1] == (byte)'\r') bytes = bytes[..^1];
                if (!System.Text.Unicode.Utf8.IsValid(bytes.Span))
                {
                    try { utf8.GetCharCount(bytes.Span); }
                    catch (System.Text.DecoderFallbackException e)
                    {
                        throw new FormatException($"not valid UTF-8 (byte 0x{(e.BytesUnknown is { Length: > 0 } u ? u[0] : 0):X2} at byte {e.Index + 1} of the line); the file must be UTF-8 encoded");
                    }
                }
                if (bytes.Span.IndexOfAnyExcept(" \t\r\n"u8) >= 0) onLine(bytes, lineNo);
            }
            catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException)
            {
                onMalformed($"{path}:{lineNo}: {e.Message.ReplaceLineEndings(" ")}");
            }
        }
        return lineNo;
    }

    /// <summary>
    /// Splits a stream into lines (without '\n'), read in 64 KiB chunks into one growing buffer; a line longer than the
    /// limit is skipped to its end without being held.
    /// </summary>
    private sealed class LineReader(Stream stream, int maxBytes)
    {
        private readonly byte[] _chunk = new byte[1 << 16];
        private int _at, _length;
        private byte[] _line = new byte[1 << 12];

        /// <summary>The next line (valid until the next call); false at the end of the stream.</summary>
        public bool Next(out ReadOnlyMemory<byte> line, out bool tooLong)
        {
            int used = 0;
            bool any = false;
            tooLong = false;
            while (true)
            {
                if (_at == _length)
                {
                    _length = stream.Read(_chunk, 0, _chunk.Length);
                    _at = 0;
                    if (_length == 0)
                    {
                        line = _line.AsMemory(0, used);
                        return any;
                    }
                }
                any = true;
                var rest = _chunk.AsSpan(_at, _length - _at);
                int newline = rest.IndexOf((byte)'\n');
                var part = newline < 0 ? rest : rest[..newline];
                if (!tooLong && (long)used + part.Length > maxBytes) tooLong = true;
                if (!tooLong)
                {
                    if (used + part.Length > _line.Length)
                        Array.Resize(ref _line, (int)Math.Min(Math.Max(2L * _line.Length, used + part.Length), Math.Max(maxBytes, 1)));
                    part.CopyTo(_line.AsSpan(used));
                    used += part.Length;
                }
                _at += part.Length;
                if (newline >= 0)
                {
                    _at++;
                    line = tooLong ? ReadOnlyMemory<byte>.Empty : _line.AsMemory(0, used);
                    return true;
                }
            }
        }
    }

    /// <summary>Parses one JSON line from its UTF-8 bytes, in place.</summary>
    public static TrainingSample Parse(ReadOnlyMemory<byte> line, SampleFormat? format, int lineNo)
    {
        using var doc = JsonDocument.Parse(line);
        return Parse(doc.RootElement, format, lineNo);
    }

    /// <summary>Parses one line's already-parsed JSON (a reader that looks at the line first parses it once).</summary>
    public static TrainingSample Parse(JsonElement root, SampleFormat? format, int lineNo)
    {
        if (root.ValueKind != JsonValueKind.Object) throw new FormatException($"a JSON object is required, found {root.ValueKind}");
        var detected = format ?? Detect(root);
        switch (detected)
        {
            case SampleFormat.Text:
                return new TrainingSample(SampleFormat.Text, RequiredString(root, "text"), null, lineNo);
            case SampleFormat.Instruction:
                return TrainingSample.FromInstruction(RequiredString(root, "instruction"), OptionalString(root, "input"), RequiredString(root, "output"), lineNo);
            default:
                if (!root.TryGetProperty("messages", out var messages) || messages.ValueKind != JsonValueKind.Array)
                    throw new FormatException("a chat sample needs \"messages\": an array of {\"role\", \"content\"}");
                var list = new List<ChatMessage>();
                foreach (var m in messages.EnumerateArray())
                {
                    if (m.ValueKind != JsonValueKind.Object) throw new FormatException($"message {list.Count} is not an object");
                    var role = RequiredString(m, "role");
                    if (role is not (ChatMessage.SystemRole or ChatMessage.UserRole or ChatMessage.AssistantRole))
                        throw new FormatException($"message {list.Count} has role '{role}'; allowed roles are system, user, assistant");
                    list.Add(new ChatMessage(role, RequiredString(m, "content")));
                }
                if (list.Count == 0) throw new FormatException("\"messages\" is empty");
                if (!list.Any(m => m.Role == ChatMessage.AssistantRole)) throw new FormatException("the conversation has no assistant turn to learn");
                return new TrainingSample(SampleFormat.Chat, null, list, lineNo);
        }
    }

    static SampleFormat Detect(JsonElement root) =>
        root.TryGetProperty("messages", out _) ? SampleFormat.Chat
        : root.TryGetProperty("instruction", out _) ? SampleFormat.Instruction
        : root.TryGetProperty("text", out _) ? SampleFormat.Text
        : throw new FormatException("not a known sample shape: expected \"text\", \"instruction\"/\"output\" or \"messages\"");

    static string RequiredString(JsonElement e, string name) =>
        e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString()!
        : throw new FormatException($"\"{name}\" must be a string");

    static string? OptionalString(JsonElement e, string name) =>
        !e.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind == JsonValueKind.String ? v.GetString() : throw new FormatException($"\"{name}\" must be a string");
}
