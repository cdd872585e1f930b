namespace QLora.Trainer;

/// <summary>The shapes of JSONL samples the trainer reads.</summary>
public enum SampleFormat
{
    /// <summary><c>{"text": ...}</c>: every token is a target.</summary>
    Text,
    /// <summary><c>{"instruction", "input", "output"}</c> (Alpaca): rendered as a user turn and an assistant answer.</summary>
    Instruction,
    /// <summary><c>{"messages": [{"role", "content"}, ...]}</c>: rendered with the model's chat template.</summary>
    Chat,
}

/// <summary>One training or evaluation example as read from a JSONL line.</summary>
/// <param name="Format">Which shape the line had.</param>
/// <param name="Text">The text of a <see cref="SampleFormat.Text"/> sample.</param>
/// <param name="Messages">The conversation of an instruction or chat sample.</param>
/// <param name="Line">1-based line number in its file, for messages.</param>
public sealed record TrainingSample(SampleFormat Format, string? Text, IReadOnlyList<ChatMessage>? Messages, int Line)
{
    /// <summary>The reference answer for exact-match evaluation: the last assistant turn, when the sample ends with one.</summary>
    public string? ReferenceAnswer => Messages is { Count: > 0 } m && m[^1].Role == ChatMessage.AssistantRole ? m[^1].Content : null;

    /// <summary>The conversation without its final answer: the prompt for exact-match evaluation.</summary>
    public IReadOnlyList<ChatMessage> PromptMessages => Messages is { Count: > 0 } m && m[^1].Role == ChatMessage.AssistantRole ? m.Take(m.Count - 1).ToList() : Messages ?? [];

    /// <summary>An Alpaca-style instruction sample: the instruction, a blank line and the input (when non-empty), answered by the output.</summary>
    public static TrainingSample FromInstruction(string instruction, string? input, string output, int line = 0) =>
        new(SampleFormat.Instruction, null,
            [ChatMessage.User(string.IsNullOrEmpty(input) ? instruction : instruction + "\n\n" + input), ChatMessage.Assistant(output)], line);
}
