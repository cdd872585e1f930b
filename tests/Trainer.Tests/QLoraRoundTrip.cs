using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// The QLoRA path a new architecture must survive, from a model folder: 4-bit load, LoRA on every linear layer, a few
/// AdamW steps, PEFT save, merge (the merged model equals base + adapter), and cached generation equal to greedy decoding
/// over the full sequence.
/// </summary>
internal static class QLoraRoundTrip
{
    /// <summary>Runs the path on <c>folder/base</c> (writing adapter and merged beside it); returns the first and last training losses.</summary>
    public static (double First, double Last) Run(TempFolder dir, long[] ids, double learningRate, int[] prompt, int newTokens)
    {
        using var scope = NewDisposeScope();
        using var model = HfModelLoader.Load(dir.File("base"), new HfModelLoader.Options { ComputeDType = ScalarType.Float32 });
        int layers = model.Config.NumHiddenLayers;
        Assert.Equal(7 * layers, model.named_modules().Select(m => m.module).OfType<Linear4bit>().Distinct().Count());
        var o = new LoraOptions { Rank = 4, Alpha = 8, TargetModules = LoraOptions.AllLinear };
        var adapted = model.ApplyLora(o, new Generator(5));
        Assert.Equal(7 * layers, adapted.Count);
        Assert.DoesNotContain(model.TrainableParameters(), p => p.Name.Contains("norm", StringComparison.Ordinal));
        model.train();
        var input = tensor(ids).unsqueeze(0);
        using var opt = optim.AdamW(model.TrainableParameters().Select(p => p.Parameter), lr: learningRate);
        double first = 0, last = 0;
        for (int step = 0; step < 8; step++)
        {
            using var stepScope = NewDisposeScope();
            opt.zero_grad();
            var (sum, tokens) = model.Loss(input, input);
            var loss = sum / tokens;
            loss.backward();
            opt.step();
            if (step == 0) first = loss.item<float>();
            last = loss.item<float>();
        }

        PeftAdapter.Save(model, o, dir.File("adapter"));
        using (var r = SafetensorsReader.Open(Path.Combine(dir.File("adapter"), PeftAdapter.WeightsFile)))
            Assert.Equal([(long)model.Config.NumAttentionHeads * model.Config.HeadDim, 4], r.GetInfo("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").Shape);
        var report = AdapterMerger.Merge(dir.File("base"), dir.File("adapter"), dir.File("merged"), FloatType.Float32);
        Assert.Equal(7 * layers, report.Merged);
        var fp32 = new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 };
        using var merged = HfModelLoader.Load(dir.File("merged"), fp32);
        using var unmerged = HfModelLoader.Load(dir.File("base"), fp32);
        PeftAdapter.Load(unmerged, dir.File("adapter"));
        merged.eval();
        unmerged.eval();
        Assert.True(Linear4bitTests.RelErr(merged.Logits(input).to(ScalarType.Float64), unmerged.Logits(input).to(ScalarType.Float64)) < 1e-4);

        var generated = TextGenerator.Generate(merged, prompt, new GenerationOptions { MaxNewTokens = newTokens });
        var sequence = prompt.Select(i => (long)i).ToList();
        for (int i = 0; i < newTokens; i++)
            sequence.Add(merged.Logits(tensor(sequence.ToArray()).unsqueeze(0))[0, -1].argmax().item<long>());
        Assert.Equal(sequence.Skip(prompt.Length).Select(x => (int)x), generated);
        return (first, last);
    }
}
