namespace QLora.Trainer;

/// <summary>
/// A conversation rendered by a <see cref="ChatTemplate"/>: the text the model reads, plus where the assistant answers are,
/// so training can compute loss on the answers only (prompt tokens masked).
/// </summary>
/// <param name="Text">The full rendered text, special-token strings included (BOS where the template writes it).</param>
/// <param name="AssistantSpans">For each assistant turn, the characters the model must learn to produce: the answer and the end-of-turn marker that follows it.</param>
public sealed record RenderedChat(string Text, IReadOnlyList<CharSpan> AssistantSpans);
