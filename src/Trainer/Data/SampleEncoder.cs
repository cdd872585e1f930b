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

    /// <summary>Encodes one sample.</summary>
    public EncodedSample Encode(TrainingSample sample)
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
        bool truncated = ids.Length > MaxSeqLength;
        if (truncated)
        {
            ids = ids[..MaxSeqLength];
            labels = labels[..MaxSeqLength];
        }
        return new EncodedSample(ids, labels, truncated);
    }

    /// <summary>The token ids of a sample's prompt with the generation header (for exact-match evaluation).</summary>
    public int[] EncodePrompt(TrainingSample sample) => sample.Format == SampleFormat.Text
        ? Tokenizer.Encode(sample.Text!, addSpecialTokens: true)
        : Tokenizer.Encode(Template.Render(sample.PromptMessages, addGenerationPrompt: true), addSpecialTokens: false);
}
