using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class TextGeneratorTests
{
    /// <summary>Greedy decoding the slow way: the whole sequence through the model at every step, no cache.</summary>
    internal static List<int> GreedyWithoutCache(LlamaForCausalLM m, int[] prompt, int n)
    {
        var ids = prompt.Select(i => (long)i).ToList();
        var output = new List<int>();
        using var _ = no_grad();
        for (int i = 0; i < n; i++)
        {
            using var scope = NewDisposeScope();
            var logits = m.Logits(tensor(ids.ToArray()).unsqueeze(0))[0, -1];
            int token = (int)logits.argmax().item<long>();
            output.Add(token);
            ids.Add(token);
        }
        return output;
    }

    [Fact]
    public void GreedyWithTheKvCacheEqualsRecomputingTheWholeSequence()
    {
        using var m = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 40, computeDType: ScalarType.Float32, initStd: 0.3);
        m.ApplyLora(new LoraOptions { Rank = 2 });
        m.eval();
        int[] prompt = [3, 14, 15, 9, 2];
        var cached = TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 12 });
        Assert.Equal(GreedyWithoutCache(m, prompt, 12), cached);
        Assert.Equal(12, cached.Count);
    }

    [Fact]
    public void GenerationStopsAtEosAndSamplingIsReproducibleAndFiltered()
    {
        using var m = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 41, computeDType: ScalarType.Float32, initStd: 0.3);
        m.eval();
        int[] prompt = [1, 2, 3];
        var greedy = TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 8 }).ToList();
        var stopped = TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 8, StopTokenIds = [greedy[2]] });
        Assert.Equal(greedy.Take(greedy.IndexOf(greedy[2]) + 1), stopped);
        // top-k = 1 is greedy whatever the temperature.
        Assert.Equal(greedy, TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 8, Temperature = 1.5, TopK = 1 }));
        var a = TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 16, Temperature = 1.0, Seed = 7 });
        var b = TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 16, Temperature = 1.0, Seed = 7 });
        Assert.Equal(a, b);
        // A tiny top-p keeps only the most likely token.
        Assert.Equal(greedy, TextGenerator.Generate(m, prompt, new GenerationOptions { MaxNewTokens = 8, Temperature = 1.0, TopP = 1e-6 }));
        Assert.Throws<ArgumentException>(() => TextGenerator.Generate(m, prompt, new GenerationOptions { TopP = 0 }));
    }

    [Fact]
    public void TopKAndTopPNeverPickAFilteredToken()
    {
        var logits = tensor(new float[] { 5f, 4f, 3f, 0f, -1f });
        var gen = new Generator(3);
        for (int i = 0; i < 200; i++)
        {
            Assert.InRange(TextGenerator.Pick(logits, new GenerationOptions { Temperature = 2, TopK = 2 }, gen), 0, 1);
            // p(0) = 0.66, p(0)+p(1) = 0.90: top-p 0.8 keeps exactly tokens 0 and 1.
            Assert.InRange(TextGenerator.Pick(logits, new GenerationOptions { Temperature = 1, TopP = 0.8 }, gen), 0, 1);
            Assert.InRange(TextGenerator.Pick(-logits, new GenerationOptions { Temperature = 1, VocabLimit = 3 }, gen), 0, 2);
        }
    }

    [Fact]
    public void BatchedGreedyOverLeftPaddedRowsEqualsOneAtATime()
    {
        using var m = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 42, computeDType: ScalarType.Float32, initStd: 0.3);
        m.ApplyLora(new LoraOptions { Rank = 2 });
        m.eval();
        int[][] prompts = [[3, 14, 15, 9, 2, 6, 5], [7], [1, 2, 3], [8, 8, 4, 4, 11], [3, 14, 15, 9, 2, 6, 5]];
        var solo = prompts.Select(p => TextGenerator.Generate(m, p, new GenerationOptions { MaxNewTokens = 10 }).ToList()).ToList();
        // Rows stop at their own EOS: a token of row 2's answer that some other row never produces.
        int eos = solo[2].First(t => solo.Any(o => !o.Contains(t)));
        var options = new GenerationOptions { MaxNewTokens = 10, StopTokenIds = [eos] };
        var expected = prompts.Select(p => TextGenerator.Generate(m, p, options)).ToList();
        Assert.Equal(solo[2].IndexOf(eos) + 1, expected[2].Count);
        Assert.Contains(expected, e => e.Count == 10); // some row runs to the limit while another has stopped
        var batched = TextGenerator.GenerateBatch(m, prompts, options);
        Assert.Equal(prompts.Length, batched.Count);
        for (int r = 0; r < prompts.Length; r++) Assert.Equal(expected[r], batched[r]);
        // The same against the cache-free reference (no stop tokens), and with a single row.
        var plain = TextGenerator.GenerateBatch(m, prompts, new GenerationOptions { MaxNewTokens = 10 });
        for (int r = 0; r < prompts.Length; r++) Assert.Equal(GreedyWithoutCache(m, prompts[r], 10), plain[r]);
        Assert.Equal(solo[1], TextGenerator.GenerateBatch(m, [prompts[1]], new GenerationOptions { MaxNewTokens = 10 })[0]);
        Assert.Throws<ArgumentException>(() => TextGenerator.GenerateBatch(m, prompts, new GenerationOptions { Temperature = 1 }));
        Assert.Throws<ArgumentException>(() => TextGenerator.GenerateBatch(m, [[1], []], new GenerationOptions()));
    }
}
