using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class AdapterMergerTests
{
    private static string WriteAdapter(string baseFolder, string dir)
    {
        using var m = HfModelLoader.Load(baseFolder, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        var o = new LoraOptions { Rank = 4, Alpha = 8, TargetModules = ["q_proj", "o_proj", "up_proj", "down_proj"] };
        m.ApplyLora(o, new Generator(3));
        using (no_grad())
            foreach (var (_, p) in m.TrainableParameters()) p.normal_(0, 0.2, generator: new Generator(4));
        PeftAdapter.Save(m, o, dir);
        return dir;
    }

    private static Tensor Logits(LlamaForCausalLM m)
    {
        m.eval();
        return m.Logits(tensor(new long[] { 4, 8, 15, 16, 23, 42 }).unsqueeze(0));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void MergedLogitsEqualBasePlusAdapterWithinBf16Rounding(bool bnbBase)
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        HfModelLoaderTests.WriteFolder(dir.File("base"), TinyLlama.Config());
        var adapter = WriteAdapter(dir.File("base"), dir.File("adapter"));
        string baseFolder = dir.File("base");
        if (bnbBase)
        {
            CheckpointQuantizer.QuantizeFolder(dir.File("base"), dir.File("bnb"), new QuantizeOptions());
            baseFolder = dir.File("bnb");
        }
        var report = AdapterMerger.Merge(baseFolder, adapter, dir.File("merged"));
        Assert.Equal(2 * 4, report.Merged);
        Assert.False(File.Exists(dir.File("merged") + "/adapter_config.json"));

        var fp32 = new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 };
        using var merged = HfModelLoader.Load(dir.File("merged"), fp32);
        // Reference: the same base (dequantized when 4-bit) with the adapter applied unmerged, in float32.
        using var reference = HfModelLoader.Load(baseFolder, bnbBase ? new HfModelLoader.Options { ComputeDType = ScalarType.Float32 } : fp32);
        PeftAdapter.Load(reference, adapter);
        var expected = Logits(reference).to(ScalarType.Float64);
        var actual = Logits(merged).to(ScalarType.Float64);
        double rel = ((actual - expected).norm() / expected.norm()).item<double>();
        Assert.True(rel < 2e-2, $"relative error {rel}"); // the merged weights are stored in bf16 (8 mantissa bits)
        Assert.True(rel > 0, "merged weights are rounded to bf16, so some difference is expected");
    }

    [Fact]
    public void MergeCanRequantizeAndRefusesAMismatchedAdapter()
    {
        using var dir = new TempFolder();
        HfModelLoaderTests.WriteFolder(dir.File("base"), TinyLlama.Config());
        var adapter = WriteAdapter(dir.File("base"), dir.File("adapter"));
        AdapterMerger.Merge(dir.File("base"), adapter, dir.File("merged-nf4"), quantize: true);
        using (var r = SafetensorsCheckpoint.Open(dir.File("merged-nf4")))
            Assert.True(r.Contains("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"));
        using (var m = HfModelLoader.Load(dir.File("merged-nf4"))) Assert.NotNull(m);

        HfModelLoaderTests.WriteFolder(dir.File("wide"), TinyLlama.Config(hidden: 48));
        var e = Assert.Throws<InvalidDataException>(() => AdapterMerger.Merge(dir.File("wide"), adapter, dir.File("bad")));
        Assert.Contains("the base weight [", e.Message);
        Assert.False(Directory.Exists(dir.File("bad")));
        Assert.Throws<IOException>(() => AdapterMerger.Merge(dir.File("base"), adapter, dir.File("merged-nf4")));
    }
}
