using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>How <see cref="TextGenerator"/> picks tokens.</summary>
public sealed record GenerationOptions
{
    /// <summary>Most tokens to add.</summary>
    public int MaxNewTokens { get; init; } = 64;
    /// <summary>0 = greedy; otherwise logits are divided by it before sampling.</summary>
    public double Temperature { get; init; }
    /// <summary>Keep only the k most likely tokens (0 = off).</summary>
    public int TopK { get; init; }
    /// <summary>Keep the smallest set of tokens whose probability reaches p (1 = off).</summary>
    public double TopP { get; init; } = 1.0;
    /// <summary>Seed of the sampler (sampling is reproducible for a seed).</summary>
    public ulong Seed { get; init; } = 42;
    /// <summary>Only ids below this are produced (the tokenizer's vocabulary when the embedding has padding rows); 0 = all.</summary>
    public int VocabLimit { get; init; }
    /// <summary>Generation stops after producing one of these (EOS ids).</summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];

    /// <summary>Checks values; throws <see cref="ArgumentException"/> naming the bad one.</summary>
    public void Validate()
    {
        if (MaxNewTokens < 0) throw new ArgumentException($"max new tokens {MaxNewTokens}: must be >= 0");
        if (!(Temperature >= 0)) throw new ArgumentException($"temperature {Temperature}: must be >= 0");
        if (TopK < 0) throw new ArgumentException($"top-k {TopK}: must be >= 0");
        if (VocabLimit < 0) throw new ArgumentException($"vocabulary limit {VocabLimit}: must be >= 0");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentException($"top-p {TopP}: must be in (0, 1]");
    }
}

/// <summary>
/// Autoregressive generation for evaluation and demos (not a serving engine): one prefill of the prompt, then one token
/// per step against a <see cref="KvCache"/>; greedy, or temperature sampling with top-k and top-p; stops at EOS.
/// </summary>
public static class TextGenerator
{
    /// <summary>The new token ids after <paramref name="prompt"/> (the stop token included when one ended generation).</summary>
    public static IReadOnlyList<int> Generate(LlamaForCausalLM model, IReadOnlyList<int> prompt, GenerationOptions options, Action<int>? onToken = null)
    {
        options.Validate();
        if (prompt.Count == 0) throw new ArgumentException("the prompt has no tokens");
        var device = model.Device; // the compute device (the embedding table may stay on the host)
        var generator = new Generator(options.Seed); // a CPU generator: sampling draws on the host on every device, so a seed means the same everywhere
        var output = new List<int>();
        bool wasTraining = model.training;
        model.eval();
        try
        {
            using var cache = new KvCache(model.model.layers.Count);
            using var noGrad = no_grad();
            var next = tensor(prompt.Select(i => (long)i).ToArray(), device: device).unsqueeze(0);
            for (int step = 0; step < options.MaxNewTokens; step++)
            {
                using var scope = NewDisposeScope();
                var hidden = model.Forward(next, cache);
                var logits = model.LmHead(hidden.narrow(1, hidden.shape[1] - 1, 1)).reshape(-1).to(ScalarType.Float32);
                int token = Pick(logits, options, generator);
                output.Add(token);
                onToken?.Invoke(token);
                if (options.StopTokenIds.Contains(token)) break;
                next.Dispose();
                next = tensor(new long[] { token }, device: device).unsqueeze(0).MoveToOuterDisposeScope();
            }
            next.Dispose();
        }
        finally
        {
            model.train(wasTraining);
        }
        return output;
    }

    /// <summary>
    /// Greedy continuations of several prompts at once (evaluation): the prompts are left-padded into one batch that shares
    /// one <see cref="KvCache"/>, each row keeps its own positions and stops at its own EOS, and the batch ends when every
    /// row has stopped or <see cref="GenerationOptions.MaxNewTokens"/> is reached. Each row's tokens equal
    /// <see cref="Generate"/>'s for that prompt alone (up to ties in float rounding). Sampling is not batched: a
    /// temperature above 0 is an <see cref="ArgumentException"/>.
    /// </summary>
    public static IReadOnlyList<IReadOnlyList<int>> GenerateBatch(LlamaForCausalLM model, IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options)
    {
        options.Validate();
        if (options.Temperature != 0) throw new ArgumentException($"temperature {options.Temperature}: batched generation is greedy only (use 0, or generate one prompt at a time)");
        if (prompts.Any(p => p.Count == 0)) throw new ArgumentException("a prompt has no tokens");
        var outputs = prompts.Select(_ => new List<int>()).ToArray();
        if (prompts.Count == 0 || options.MaxNewTokens == 0) return outputs;
        var device = model.Device; // the compute device (the embedding table may stay on the host)
        int rows = prompts.Count, width = prompts.Max(p => p.Count);
        var ids = new long[rows * width];
        var padding = new long[rows];
        for (int r = 0; r < rows; r++)
        {
            padding[r] = width - prompts[r].Count;
            for (int j = 0; j < prompts[r].Count; j++) ids[r * width + padding[r] + j] = prompts[r][j];
        }
        var done = new bool[rows];
        int left = rows;
        bool wasTraining = model.training;
        model.eval();
        try
        {
            using var cache = new KvCache(model.model.layers.Count);
            using var noGrad = no_grad();
            using var pad = tensor(padding, device: device);
            var next = tensor(ids, [rows, width], device: device);
            for (int step = 0; step < options.MaxNewTokens && left > 0; step++)
            {
                using var scope = NewDisposeScope();
                var hidden = model.Forward(next, cache, pad);
                var logits = model.LmHead(hidden.narrow(1, hidden.shape[1] - 1, 1)).reshape(rows, -1).to(ScalarType.Float32);
                if (options.VocabLimit > 0 && options.VocabLimit < logits.shape[1]) logits = logits.narrow(1, 0, options.VocabLimit);
                var chosen = logits.argmax(1).to(ScalarType.Int64).cpu();
                var tokens = chosen.data<long>().ToArray();
                for (int r = 0; r < rows; r++)
                {
                    if (done[r]) continue;
                    outputs[r].Add((int)tokens[r]);
                    if (options.StopTokenIds.Contains((int)tokens[r])) { done[r] = true; left--; }
                }
                next.Dispose();
                next = chosen.to(device).view(rows, 1).MoveToOuterDisposeScope(); // a stopped row keeps decoding; its tokens are dropped
            }
            next.Dispose();
        }
        finally
        {
            model.train(wasTraining);
        }
        return outputs;
    }

    /// <summary>The next token from a [vocab] float32 logits vector.</summary>
    public static int Pick(Tensor logits, GenerationOptions o, Generator generator)
    {
        using var scope = NewDisposeScope();
        if (o.VocabLimit > 0 && o.VocabLimit < logits.shape[0]) logits = logits.narrow(0, 0, o.VocabLimit);
        if (o.Temperature == 0) return (int)logits.argmax().item<long>();
        var scores = logits / o.Temperature;
        if (o.TopK > 0 && o.TopK < scores.shape[0])
        {
            var kth = scores.topk(o.TopK).values.min();
            scores = scores.masked_fill(scores.lt(kth), double.NegativeInfinity);
        }
        if (o.TopP < 1.0)
        {
            var (sorted, order) = scores.sort(descending: true);
            var cumulative = sorted.softmax(0).cumsum(0);
            // Drop a token when the tokens before it already reach p (so the first is always kept).
            var drop = (cumulative - sorted.softmax(0)).ge(o.TopP);
            var dropInOrder = zeros_like(drop).scatter(0, order, drop);
            scores = scores.masked_fill(dropInOrder, double.NegativeInfinity);
        }
        var probs = scores.softmax(0);
        if (probs.device_type != generator.device.type) probs = probs.to(generator.device);
        return (int)probs.multinomial(1, generator: generator).item<long>();
    }
}
