namespace QLora.Trainer;

/// <summary>
/// Turns samples into token ids and labels: text samples train on every token (with BOS/EOS as the tokenizer adds them);
/// instruction and chat samples are rendered with the chat template and train on the assistant answers only (their
/// end-of-turn marker included), unless <see cref="TrainOnPrompt"/>. Samples longer than the maximum are truncated.
/// </summary>
public sealed class SampleEncoder(HfTokenizer tokenizer, ChatTemplate template, int maxSeqLength, bool trainOnPrompt = false)
{
    /// <summary>The tokenizer.</summary>
    public HfTokenizer Tokenizer { get; } = tokenizer;
    /// <summary>The chat template for instruction and chat samples.</summary>
    public ChatTemplate Template { get; } = template;
    /// <summary>Rows are cut to this many tokens.</summary>
    public int MaxSeqLength { get; } = maxSeqLength;
    /// <summary>Whether prompt tokens are targets too.</summary>
    public bool TrainOnPrompt { get; } = trainOnPrompt;

    /// <summary>
    /// Tokens past <see cref="MaxSeqLength"/> that a cut text must still produce before its first
    /// <see cref="MaxSeqLength"/> tokens are trusted to be the whole text's: BPE merges near the cut may differ, and
    /// only there.
    /// </summary>
    public const int CutMarginTokens = 64;

    /// <summary>
    /// The most characters of sample text tokenized (text, or the messages' contents together, in order): what
    /// <see cref="MaxSeqLength"/> + <see cref="CutMarginTokens"/> tokens can cover at most, so a longer sample is cut
    /// before tokenizing, keeping its start as the truncation after tokenizing does. A 10 MB line costs its string, not
    /// the tokenization of 10 MB.
    /// </summary>
    public long MaxTextChars => ((long)MaxSeqLength + CutMarginTokens) * Tokenizer.LongestTokenChars;

    /// <summary>
    /// Encodes one sample. A sample whose text is longer than <see cref="MaxTextChars"/> is cut first; if the cut text
    /// then gives fewer than <see cref="MaxSeqLength"/> + <see cref="CutMarginTokens"/> tokens (a normalizer or template
    /// dropped characters), the whole sample is encoded instead.
    /// </summary>
    public EncodedSample Encode(TrainingSample sample)
    {
        if (Cut(sample) is { } cut)
        {
            var (encoded, tokens) = EncodeWhole(cut);
            if (tokens >= (long)MaxSeqLength + CutMarginTokens) return encoded with { CutBeforeTokenizing = true };
        }
        return EncodeWhole(sample).Sample;
    }

    /// <summary>The sample with its text (or its messages' contents together) cut to <see cref="MaxTextChars"/>; null when it fits.</summary>
    public TrainingSample? Cut(TrainingSample sample)
    {
        long budget = MaxTextChars;
        if (sample.Format == SampleFormat.Text)
            return sample.Text!.Length > budget ? sample with { Text = Head(sample.Text, budget) } : null;
        long total = 0;
        foreach (var m in sample.Messages!) total += m.Content.Length;
        if (total <= budget) return null;
        var messages = new List<ChatMessage>(sample.Messages.Count);
        foreach (var m in sample.Messages)
        {
            string content = m.Content.Length <= budget ? m.Content : Head(m.Content, budget);
            budget -= content.Length;
            messages.Add(m with { Content = content });
        }
        return sample with { Messages = messages };
    }

    // The first n characters, not splitting a surrogate pair.
    private static string Head(string text, long n)
    {
        int length = (int)Math.Clamp(n, 0, text.Length);
        if (length > 0 && length < text.Length && char.IsHighSurrogate(text[length - 1])) length--;
        return text[..length];
    }

    // The encoded sample (truncated to MaxSeqLength) and how many tokens the text gave before truncation.
    private (EncodedSample Sample, int Tokens) EncodeWhole(TrainingSample sample)
    {
        int[] ids, labels;
        if (sample.Format == SampleFormat.Text)
        {
            var encoded = Tokenizer.Encode(sample.Text!, addSpecialTokens: true).ToList();
            if (Tokenizer.EosTokenId is int eos && (encoded.Count == 0 || encoded[^1] != eos)) encoded.Add(eos);
            ids = [.. encoded];
            labels = (int[])ids.Clone();
        }
        else
        {
            var chat = Tokenizer.EncodeChat(Template.RenderWithSpans(sample.Messages!, addGenerationPrompt: false));
            ids = chat.InputIds;
            labels = TrainOnPrompt ? (int[])ids.Clone() : chat.Labels();
        }
        int tokens = ids.Length;
        bool truncated = tokens > MaxSeqLength;
        if (truncated)
        {
            ids = ids[..MaxSeqLength];
            labels = labels[..MaxSeqLength];
        }
        return (new EncodedSample(ids, labels, truncated), tokens);
    }

    /// <summary>The token ids of a sample's prompt with the generation header (for exact-match evaluation).</summary>
    public int[] EncodePrompt(TrainingSample sample)
    {
        // Cut as Encode cuts (the prompt's start kept); the whole prompt when the cut text gives too few tokens.
        if (Cut(sample) is { } cut && EncodePromptWhole(cut) is { } ids && ids.Length >= (long)MaxSeqLength + CutMarginTokens) return ids;
        return EncodePromptWhole(sample);
    }

    private int[] EncodePromptWhole(TrainingSample sample) => sample.Format == SampleFormat.Text
        ? Tokenizer.Encode(sample.Text!, addSpecialTokens: true)
        : Tokenizer.Encode(Template.Render(sample.PromptMessages, addGenerationPrompt: true), addSpecialTokens: false);
}
