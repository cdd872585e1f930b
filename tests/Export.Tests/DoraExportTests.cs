using QLora.Quant.Gguf;
using QLora.Trainer;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace QLora.Export.Tests;

/// <summary>
/// A DoRA adapter (PEFT's use_dora) on the bundled model goes to GGUF through the same merge as <c>qlora merge</c>
/// (W' = m / ‖W + scaling·B·A‖ · (W + scaling·B·A) per row), and llama.cpp's logits agree with qlora's unmerged DoRA
/// forward (float32 compute).
/// </summary>
public sealed class DoraExportTests(ExportedTinyModel model, ITestOutputHelper output) : IClassFixture<ExportedTinyModel>
{
    [Fact]
    public void A_dora_adapter_exports_merged_and_agrees_in_llama_cpp()
    {
        var adapter = Path.Combine(model.Dir, "dora-adapter");
        using var reference = HfModelLoader.Load(model.BaseFolder, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        var options = new LoraOptions { Rank = 8, Alpha = 16, UseDora = true };
        var generator = new Generator(11);
        reference.ApplyLora(options, generator);
        using (no_grad())
        {
            foreach (var (_, layer) in reference.LoraLayers)
            {
                var b = layer.LoraB("default");
                b.copy_(randn(b.shape, generator: generator) * 0.004);
                var m = layer.Magnitude("default")!;
                m.mul_(rand(m.shape, generator: generator) * 0.2 + 0.9); // rows rescaled by 0.9-1.1
            }
        }
        reference.eval();
        PeftAdapter.Save(reference, options, adapter);

        var gguf = Path.Combine(model.Dir, "dora-f16.gguf");
        var report = GgufExporter.Export(model.BaseFolder, adapter, gguf, GgufFileType.F16);
        Assert.Equal(28, report.Merged);
        using var cpp = new LlamaCpp(gguf);
        double worst = 0, moved = 0;
        reference.DisableAdapters(true);
        var plain = ExportedTinyModel.Prompts.Select(p => Logits.Of(reference, model.Tokenizer.Encode(p, addSpecialTokens: true))).ToList();
        reference.DisableAdapters(false);
        for (int i = 0; i < ExportedTinyModel.Prompts.Length; i++)
        {
            var ids = model.Tokenizer.Encode(ExportedTinyModel.Prompts[i], addSpecialTokens: true);
            var expected = Logits.Of(reference, ids);
            worst = Math.Max(worst, Logits.MaxDifference(expected, cpp.Logits(ids)));
            moved = Math.Max(moved, Logits.MaxDifference(expected, plain[i]));
        }
        output.WriteLine($"DoRA adapter, f16 GGUF: max |logit difference| {worst:G3} (the adapter itself moves logits by up to {moved:G3})");
        Assert.True(moved > 0.5, $"the adapter must change the model visibly (it moves logits by {moved})");
        Assert.True(worst <= 0.1, $"llama.cpp's logits differ from qlora's unmerged DoRA forward by up to {worst}");
    }
}
