using System.Text.Json;

namespace QLora.Trainer;

/// <summary>
/// One multiple-choice question, as a JSONL line <c>{"question": …, "choices": […], "answer": &lt;index&gt;}</c>: scored by
/// the log-likelihood the model gives each choice after the question (lm-evaluation-harness's <c>multiple_choice</c>).
/// </summary>
/// <param name="Question">The question (the user turn, or the context of a text job).</param>
/// <param name="Choices">At least two candidate answers.</param>
/// <param name="Answer">The index of the right one.</param>
/// <param name="Line">1-based line number in its file, for messages.</param>
public sealed record MultipleChoiceItem(string Question, IReadOnlyList<string> Choices, int Answer, int Line = 0)
{
    /// <summary>True when a JSON line is a multiple-choice item (it has "choices") rather than a training sample.</summary>
    public static bool IsItem(JsonElement root) => root.ValueKind == JsonValueKind.Object && root.TryGetProperty("choices", out _);

    /// <summary>Parses one item; a <see cref="FormatException"/> says which field is wrong.</summary>
    public static MultipleChoiceItem Parse(JsonElement root, int line)
    {
        if (!root.TryGetProperty("question", out var q) || q.ValueKind != JsonValueKind.String)
            throw new FormatException("\"question\" must be a string");
        if (!root.TryGetProperty("choices", out var c) || c.ValueKind != JsonValueKind.Array)
            throw new FormatException("\"choices\" must be an array of strings");
        var choices = new List<string>();
        foreach (var e in c.EnumerateArray())
        {
            if (e.ValueKind != JsonValueKind.String || e.GetString() is not { Length: > 0 } s)
                throw new FormatException($"choice {choices.Count} must be a non-empty string");
            choices.Add(s);
        }
        if (choices.Count < 2) throw new FormatException($"\"choices\" has {choices.Count} entries; a question needs at least two");
        if (!root.TryGetProperty("answer", out var a) || a.ValueKind != JsonValueKind.Number || !a.TryGetInt32(out int answer) || answer < 0 || answer >= choices.Count)
            throw new FormatException($"\"answer\" must be the index of the right choice, an integer from 0 to {choices.Count - 1}");
        return new MultipleChoiceItem(q.GetString()!, choices, answer, line);
    }

    /// <summary>Reads a JSONL file of items only (<c>Eval:ChoicesFile</c>); a bad line is one error naming the file and line.</summary>
    public static IReadOnlyList<MultipleChoiceItem> Read(string path)
    {
        var (samples, items) = EvalDataset.Read(path, format: null);
        if (samples.Count > 0) throw new DataFormatException($"{path}:{samples[0].Line}: not a multiple-choice line (it needs \"question\", \"choices\" and \"answer\")");
        return items;
    }
}
