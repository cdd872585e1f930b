using QLora.Quant;
using QLora.Quant.Gguf;
using QLora.Trainer;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace QLora.Export.Tests;

/// <summary>
/// A bnb-4bit base (the bundled model quantized by <c>qlora quantize</c>'s library call) with the adapter: the GGUF
/// file holds the dequantized NF4 weights plus the merged delta, and llama.cpp agrees with qlora's forward of the same
/// 4-bit model with the adapter (float32 compute).
/// </summary>
public sealed class BnbBaseExportTests(ExportedTinyModel model, ITestOutputHelper output) : IClassFixture<ExportedTinyModel>
{
    [Fact]
    public void A_bnb_4bit_base_with_an_adapter_exports_and_agrees_in_llama_cpp()
    {
        var bnb = Path.Combine(model.Dir, "bnb-base");
        CheckpointQuantizer.QuantizeFolder(model.BaseFolder, bnb, new QuantizeOptions());
        var gguf = Path.Combine(model.Dir, "bnb-f16.gguf");
        var report = GgufExporter.Export(bnb, model.Adapter, gguf, GgufFileType.F16);
        Assert.Equal(28, report.Merged);
        Assert.Equal(39, report.Tensors);

        using var reference = HfModelLoader.Load(bnb, new HfModelLoader.Options { ComputeDType = ScalarType.Float32 });
        PeftAdapter.Load(reference, model.Adapter);
        reference.eval();
        using var cpp = new LlamaCpp(gguf);
        double worst = 0;
        foreach (var prompt in ExportedTinyModel.Prompts)
        {
            var ids = model.Tokenizer.Encode(prompt, addSpecialTokens: true);
            worst = Math.Max(worst, Logits.MaxDifference(Logits.Of(reference, ids), cpp.Logits(ids)));
        }
        output.WriteLine($"bnb-4bit base + adapter, f16 GGUF: max |logit difference| {worst:G3}");
        // measured 0.043: above the dense f16 case (0.024), as the 4-bit forward adds its own dequantization path
        Assert.True(worst <= 0.1, $"llama.cpp's logits differ from qlora's 4-bit forward by up to {worst}");
    }
}
