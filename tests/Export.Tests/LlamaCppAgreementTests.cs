using QLora.Quant.Gguf;
using QLora.Trainer;
using Xunit.Abstractions;

namespace QLora.Export.Tests;

/// <summary>
/// The exported file of base + adapter, run by llama.cpp, against qlora's own float32 forward of base + adapter
/// (unmerged LoRA). llama.cpp computes with f16 (or bf16) weights and activations in its matmuls, so logits agree
/// within a tolerance and greedy text agrees up to the first near-tie, not for ever (../shared/spec/gguf.md).
/// </summary>
public sealed class LlamaCppAgreementTests(ExportedTinyModel model, ITestOutputHelper output) : IClassFixture<ExportedTinyModel>
{
    [Theory]
    [InlineData(GgufFileType.F16, 0.05)]
    [InlineData(GgufFileType.BF16, 0.25)]
    public void Logits_of_fixed_prompts_agree_with_qlora_within_a_tolerance(GgufFileType type, double tolerance)
    {
        using var cpp = new LlamaCpp(model.File(type));
        double worst = 0;
        foreach (var prompt in ExportedTinyModel.Prompts)
        {
            var ids = model.Tokenizer.Encode(prompt, addSpecialTokens: true);
            Assert.Equal(ids, cpp.Tokenize(prompt)); // same tokenizer: BOS, then the byte-level pieces
            worst = Math.Max(worst, Logits.MaxDifference(model.ReferenceLogits(ids), cpp.Logits(ids)));
        }
        output.WriteLine($"{type.Name()}: max |logit difference| {worst:G4} over {ExportedTinyModel.Prompts.Length} prompts (tolerance {tolerance})");
        Assert.True(worst <= tolerance, $"{type.Name()}: llama.cpp's logits differ from qlora's by up to {worst}");
    }

    [Fact]
    public void Greedy_continuations_agree_with_qlora_up_to_the_first_near_tie()
    {
        // qlora generates greedily; llama.cpp then sees prompt + that continuation in one batch, and at every generated
        // position its top-1 must be qlora's token, until qlora's own top two are within the tie margin there.
        const double tieMargin = 0.1;
        using var cpp = new LlamaCpp(model.File(GgufFileType.F16));
        int compared = 0, total = 0;
        foreach (var prompt in ExportedTinyModel.Prompts)
        {
            var ids = model.Tokenizer.Encode(prompt, addSpecialTokens: true);
            var generated = TextGenerator.Generate(model.Reference, ids, new GenerationOptions { MaxNewTokens = 16, VocabLimit = model.Tokenizer.VocabSize });
            var all = ids.Concat(generated).ToArray();
            var expected = model.ReferenceLogits(all);
            var actual = cpp.Logits(all);
            int agreed = 0;
            for (int k = 0; k < generated.Count; k++)
            {
                int p = ids.Length - 1 + k;
                var (top, second) = TopTwo(expected[p]);
                if (top.Value - second.Value < tieMargin) break;
                Assert.Equal(generated[k], top.Index); // qlora's greedy pick is its own argmax
                Assert.True(ArgMax(actual[p]) == generated[k], $"'{prompt}': llama.cpp picks {ArgMax(actual[p])} at generated token {k}, qlora {generated[k]} (margin {top.Value - second.Value:G3})");
                agreed++;
            }
            output.WriteLine($"'{prompt}' -> '{model.Tokenizer.Decode(generated)}': {agreed} of {generated.Count} tokens compared before a near-tie");
            compared += agreed;
            total += generated.Count;
        }
        output.WriteLine($"{compared} of {total} generated tokens compared");
        Assert.True(compared >= 16, $"only {compared} of {total} generated tokens came before a near-tie; the comparison proves little");
    }

    [Theory]
    [InlineData(GgufFileType.Q8_0, 0.95, 0.02)]
    [InlineData(GgufFileType.Q4_K_M, 0.80, 0.15)]
    [InlineData(GgufFileType.Q4_0, 0.80, 0.15)]
    public void Quantized_files_keep_top1_agreement_and_perplexity_close(GgufFileType type, double minAgreement, double maxPerplexityChange)
    {
        using var cpp = new LlamaCpp(model.File(type));
        int agree = 0, positions = 0;
        double nllRef = 0, nllCpp = 0;
        int predicted = 0;
        foreach (var prompt in EvalTexts())
        {
            var ids = model.Tokenizer.Encode(prompt, addSpecialTokens: true);
            var expected = model.ReferenceLogits(ids);
            var actual = cpp.Logits(ids);
            for (int p = 0; p < ids.Length; p++)
            {
                if (ArgMax(expected[p]) == ArgMax(actual[p])) agree++;
                positions++;
                if (p + 1 < ids.Length)
                {
                    nllRef -= LogSoftmax(expected[p], ids[p + 1]);
                    nllCpp -= LogSoftmax(actual[p], ids[p + 1]);
                    predicted++;
                }
            }
        }
        double agreement = (double)agree / positions;
        double pplRef = Math.Exp(nllRef / predicted), pplCpp = Math.Exp(nllCpp / predicted);
        double change = Math.Abs(pplCpp / pplRef - 1);
        output.WriteLine($"{type.Name()}: top-1 agreement {agreement:P1} over {positions} positions; perplexity {pplCpp:F4} vs qlora {pplRef:F4} ({change:P2})");
        Assert.True(agreement >= minAgreement, $"{type.Name()}: top-1 agreement {agreement:P1} < {minAgreement:P0}");
        Assert.True(change <= maxPerplexityChange, $"{type.Name()}: perplexity {pplCpp} vs {pplRef}");
    }

    /// <summary>The first 8 eval samples of the quick start, as prompt + answer text.</summary>
    private static IEnumerable<string> EvalTexts()
    {
        var path = Path.Combine(ExportedTinyModel.RepoRoot(), "data", "quickstart", "eval.jsonl");
        foreach (var line in File.ReadLines(path).Take(8))
        {
            var o = System.Text.Json.Nodes.JsonNode.Parse(line)!;
            yield return $"[INST] {o["instruction"]}\n{o["input"]} [/INST]{o["output"]}";
        }
    }

    private static int ArgMax(float[] x)
    {
        int best = 0;
        for (int i = 1; i < x.Length; i++) if (x[i] > x[best]) best = i;
        return best;
    }

    private static ((int Index, float Value) Top, (int Index, float Value) Second) TopTwo(float[] x)
    {
        int a = ArgMax(x), b = a == 0 ? 1 : 0;
        for (int i = 0; i < x.Length; i++) if (i != a && x[i] > x[b]) b = i;
        return ((a, x[a]), (b, x[b]));
    }

    private static double LogSoftmax(float[] x, int target)
    {
        double max = x.Max(), sum = 0;
        foreach (var v in x) sum += Math.Exp(v - max);
        return x[target] - max - Math.Log(sum);
    }
}
