using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>Accuracy over multiple-choice items, both of lm-evaluation-harness's variants.</summary>
/// <param name="Items">Items scored.</param>
/// <param name="Correct">Items whose highest summed log-likelihood is the answer (<c>acc</c>).</param>
/// <param name="CorrectNorm">Items whose highest log-likelihood per character of the choice is the answer (<c>acc_norm</c>).</param>
public sealed record MultipleChoiceResult(int Items, int Correct, int CorrectNorm)
{
    /// <summary>acc: the fraction right by summed log-likelihood.</summary>
    public double Accuracy => Items == 0 ? double.NaN : (double)Correct / Items;
    /// <summary>acc_norm: the fraction right by log-likelihood divided by the choice's length in characters.</summary>
    public double AccuracyNorm => Items == 0 ? double.NaN : (double)CorrectNorm / Items;
}

/// <summary>
/// Scores multiple-choice items by log-likelihood, as lm-evaluation-harness's <c>multiple_choice</c> tasks do: for each
/// choice, the sum of log p(choice token | everything before it) over the choice's tokens after the question's context;
/// the prediction is the choice with the highest sum (<c>acc</c>) or the highest sum divided by the choice's length in
/// characters (<c>acc_norm</c>, the harness's <c>len(choice)</c>), ties to the first. Context and choice are split as
/// the harness splits them: the continuation is the tokens of context + choice after the context's own tokens.
/// </summary>
/// <remarks>
/// The context is the question as the job renders a prompt: with the chat template, a user turn followed by the
/// assistant header (the prompt exact match generates from), so a choice is scored as the answer the job trains on,
/// without the end-of-turn marker; for a plain-text job (<c>Data:Format text</c>), the question itself followed by a
/// space, the harness's default target delimiter. Requests are scored <c>batchSize</c> rows at a time, right-padded
/// (causal attention keeps padding out of every real position), longest first; only the positions that predict a
/// choice token go through lm_head, in float32.
/// </remarks>
public sealed class MultipleChoiceScorer(LlamaForCausalLM model, SampleEncoder encoder, bool plainText, int batchSize)
{
    /// <summary>The context tokens and one continuation per choice.</summary>
    public (int[] Context, int[][] Continuations) Encode(MultipleChoiceItem item)
    {
        var tokenizer = encoder.Tokenizer;
        string context = plainText ? item.Question : encoder.Template.Render([ChatMessage.User(item.Question)], addGenerationPrompt: true);
        string delimiter = plainText ? " " : "";
        int[] ctx = tokenizer.Encode(context, addSpecialTokens: plainText);
        var continuations = item.Choices.Select(choice =>
        {
            int[] whole = tokenizer.Encode(context + delimiter + choice, addSpecialTokens: plainText);
            if (whole.Length <= ctx.Length)
                throw new InvalidDataException($"line {item.Line}: choice '{choice}' adds no token after the question's {ctx.Length} tokens");
            return whole[ctx.Length..];
        }).ToArray();
        return (ctx, continuations);
    }

    /// <summary>Σ log p over each continuation's tokens, for (context, continuation) pairs, in their order.</summary>
    public double[] LogLikelihoods(IReadOnlyList<(int[] Context, int[] Continuation)> requests)
    {
        int max = encoder.MaxSeqLength;
        // The harness's left truncation: the last max + 1 tokens of context + continuation, the last one only a target.
        var rows = requests.Select((r, i) =>
        {
            if (r.Continuation.Length > max)
                throw new InvalidDataException($"a choice of {r.Continuation.Length} tokens is longer than Data:MaxSeqLength {max}");
            int[] full = [.. r.Context, .. r.Continuation];
            return (Index: i, Tokens: full.Length > max + 1 ? full[^(max + 1)..] : full, Continuation: r.Continuation);
        }).OrderByDescending(r => r.Tokens.Length).ToList();
        var result = new double[requests.Count];
        bool wasTraining = model.training;
        model.eval();
        try
        {
            using var noGrad = no_grad();
            foreach (var chunk in rows.Chunk(Math.Max(1, batchSize)))
            {
                using var scope = NewDisposeScope();
                int t = chunk.Max(r => r.Tokens.Length) - 1;
                var ids = new long[chunk.Length * t];
                var positions = new List<long>();
                var targets = new List<long>();
                for (int b = 0; b < chunk.Length; b++)
                {
                    var tokens = chunk[b].Tokens;
                    for (int j = 0; j < tokens.Length - 1; j++) ids[b * t + j] = tokens[j];
                    int first = tokens.Length - 1 - chunk[b].Continuation.Length; // the position whose next token is the first choice token
                    for (int j = 0; j < chunk[b].Continuation.Length; j++)
                    {
                        positions.Add(b * t + first + j);
                        targets.Add(chunk[b].Continuation[j]);
                    }
                }
                var device = model.Device;
                var hidden = model.Forward(tensor(ids, [chunk.Length, t], device: device));
                var selected = hidden.reshape(-1, hidden.shape[^1]).index_select(0, tensor(positions.ToArray(), device: device));
                var logp = model.LmHead(selected).to(ScalarType.Float32).log_softmax(-1)
                    .gather(1, tensor(targets.ToArray(), device: device).unsqueeze(1)).squeeze(1);
                var values = logp.to(ScalarType.Float64).cpu().data<double>().ToArray();
                int k = 0;
                foreach (var row in chunk)
                {
                    double sum = 0;
                    for (int j = 0; j < row.Continuation.Length; j++) sum += values[k++];
                    result[row.Index] = sum;
                }
            }
        }
        finally
        {
            model.train(wasTraining);
        }
        return result;
    }

    /// <summary>Scores <paramref name="items"/>: all their choices, batched together.</summary>
    public MultipleChoiceResult Score(IReadOnlyList<MultipleChoiceItem> items)
    {
        var encoded = items.Select(Encode).ToList();
        var requests = encoded.SelectMany(e => e.Continuations.Select(c => (e.Context, c))).ToList();
        var lls = LogLikelihoods(requests);
        int k = 0, correct = 0, correctNorm = 0;
        foreach (var item in items)
        {
            var ll = lls.AsSpan(k, item.Choices.Count).ToArray();
            k += item.Choices.Count;
            if (ArgMax(ll) == item.Answer) correct++;
            if (ArgMax([.. ll.Select((x, i) => x / CharacterCount(item.Choices[i]))]) == item.Answer) correctNorm++;
        }
        return new MultipleChoiceResult(items.Count, correct, correctNorm);
    }

    /// <summary>The first index of the largest value (numpy's argmax).</summary>
    public static int ArgMax(IReadOnlyList<double> values)
    {
        int best = 0;
        for (int i = 1; i < values.Count; i++) if (values[i] > values[best]) best = i;
        return best;
    }

    /// <summary>A string's length as Python's len() counts it: Unicode code points.</summary>
    public static int CharacterCount(string s)
    {
        int n = 0;
        for (int i = 0; i < s.Length; i++) { n++; if (char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1])) i++; }
        return n;
    }
}
