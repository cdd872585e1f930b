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

    /// <summary>The longest line read by default (bytes): far more text than any sample of the allowed lengths needs.</summary>
    public const int DefaultMaxLineBytes = 1 << 20;

    /// <summary>
    /// Reads <paramref name="path"/>. <paramref name="format"/> is null for per-line detection, or the one format every
    /// line must have. Lines are decoded as strict UTF-8 (invalid bytes are a malformed line, reported as file:line),
    /// and a line longer than <paramref name="maxLineBytes"/> is a malformed line that is never held in memory whole.
    /// </summary>
    public static Result Read(string path, SampleFormat? format = null, bool skipMalformed = false, int maxLineBytes = DefaultMaxLineBytes)
    {
        if (Directory.Exists(path)) throw new IOException($"dataset {path} is a folder; a JSONL file is expected");
        if (!File.Exists(path)) throw new FileNotFoundException($"dataset {path} does not exist");
        var samples = new List<TrainingSample>();
        int skipped = 0, lineNo = 0;
        string? first = null;
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        var bytes = new List<byte>();
        var utf8 = new System.Text.UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
        while (ReadLine(stream, bytes, maxLineBytes, out bool tooLong, out bool end))
        {
            lineNo++;
            try
            {
                if (tooLong) throw new FormatException($"the line is longer than {maxLineBytes:N0} bytes, more text than a sample of Data:MaxSeqLength tokens can use");
                int start = lineNo == 1 && bytes.Count >= 3 && bytes[0] == 0xEF && bytes[1] == 0xBB && bytes[2] == 0xBF ? 3 : 0;
                int count = bytes.Count - start;
                if (count > 0 && bytes[^1] == (byte)'\r') count--;
                string line;
                try { line = utf8.GetString(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(bytes).Slice(start, count)); }
                catch (System.Text.DecoderFallbackException e)
                {
                    throw new FormatException($"not valid UTF-8 (byte 0x{(e.BytesUnknown is { Length: > 0 } u ? u[0] : 0):X2} at byte {e.Index + 1} of the line); the file must be UTF-8 encoded");
                }
                if (!string.IsNullOrWhiteSpace(line)) samples.Add(Parse(line, format, lineNo));
            }
            catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException)
            {
                var message = $"{path}:{lineNo}: {e.Message.ReplaceLineEndings(" ")}";
                if (!skipMalformed) throw new DataFormatException(message + " (set Data:MalformedLines to skip to skip such lines)");
                skipped++;
                first ??= message;
            }
            if (end) break;
        }
        if (samples.Count == 0) throw new DataFormatException($"{path}: no samples ({lineNo} lines, {skipped} malformed)");
        return new Result(samples, skipped, first);
    }

    // The next line's bytes (without '\n'), at most maxBytes of them kept; false at the end of the file.
    static bool ReadLine(Stream stream, List<byte> bytes, int maxBytes, out bool tooLong, out bool end)
    {
        bytes.Clear();
        tooLong = false;
        end = false;
        int b, read = 0;
        while ((b = stream.ReadByte()) >= 0)
        {
            read++;
            if (b == '\n') return true;
            if (bytes.Count < maxBytes) bytes.Add((byte)b);
            else tooLong = true;
        }
        end = true;
        return read > 0;
    }

    /// <summary>Parses one JSON line.</summary>
    public static TrainingSample Parse(string line, SampleFormat? format, int lineNo)
    {
        using var doc = JsonDocument.Parse(line);
        var root = doc.RootElement;
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
