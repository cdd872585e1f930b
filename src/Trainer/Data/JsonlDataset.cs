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

    /// <summary>Reads <paramref name="path"/>. <paramref name="format"/> is null for per-line detection, or the one format every line must have.</summary>
    public static Result Read(string path, SampleFormat? format = null, bool skipMalformed = false)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"dataset {path} does not exist");
        var samples = new List<TrainingSample>();
        int skipped = 0, lineNo = 0;
        string? first = null;
        foreach (var line in File.ReadLines(path))
        {
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                samples.Add(Parse(line, format, lineNo));
            }
            catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException)
            {
                var message = $"{path}:{lineNo}: {e.Message.ReplaceLineEndings(" ")}";
                if (!skipMalformed) throw new DataFormatException(message + " (set Data:MalformedLines to skip to skip such lines)");
                skipped++;
                first ??= message;
            }
        }
        if (samples.Count == 0) throw new DataFormatException($"{path}: no samples ({lineNo} lines, {skipped} malformed)");
        return new Result(samples, skipped, first);
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
