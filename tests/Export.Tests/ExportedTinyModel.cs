using QLora.Quant.Gguf;
using QLora.Trainer;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Export.Tests;

/// <summary>
/// The bundled models/tiny-llama-base with a LoRA adapter the fixture builds (rank 8 on every projection, random A and
/// B so the merge changes every adapted weight by about a tenth of its spread), saved in PEFT format; qlora's own forward of base + adapter in
/// float32 is the reference; GGUF exports of it are made once per type.
/// </summary>
public sealed class ExportedTinyModel : IDisposable
{
    private readonly Dictionary<GgufFileType, string> _files = [];
    private readonly Lock _lock = new();
    private readonly Dictionary<string, float[][]> _logits = [];

    public ExportedTinyModel()
    {
        Dir = Path.Combine(Path.GetTempPath(), "qlora-export-tests-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Dir);
        BaseFolder = Path.Combine(RepoRoot(), "models", "tiny-llama-base");
        Adapter = Path.Combine(Dir, "adapter");
        Reference = HfModelLoader.Load(BaseFolder, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        var options = new LoraOptions { Rank = 8, Alpha = 16 };
        var generator = new Generator(7);
        Reference.ApplyLora(options, generator);
        using (no_grad())
        {
            foreach (var (_, layer) in Reference.LoraLayers)
            {
                var b = layer.LoraB("default");
                b.copy_(randn(b.shape, generator: generator) * 0.004);
            }
        }
        Reference.eval();
        PeftAdapter.Save(Reference, options, Adapter);
        Tokenizer = HfTokenizer.Load(BaseFolder);
    }

    public string Dir { get; }
    public string BaseFolder { get; }
    public string Adapter { get; }
    public LlamaForCausalLM Reference { get; }
    public HfTokenizer Tokenizer { get; }

    /// <summary>Prompts in the style of the base model's pretraining corpus (examples/PretrainTiny), whose continuations it copies from context.</summary>
    public static readonly string[] Prompts =
    [
        "The code 1998-03-14 was read back as",
        "In June 25, 1969, the month is",
        "Month 05 comes after month",
        "[INST] Write the month of this date as a two-digit number.\nAugust 5, 2023 [/INST]",
    ];

    /// <summary>The GGUF file of base + adapter as <paramref name="type"/>, exported on first use.</summary>
    public string File(GgufFileType type)
    {
        lock (_lock)
        {
            if (!_files.TryGetValue(type, out var path))
            {
                path = Path.Combine(Dir, $"tiny-{type.Name()}.gguf");
                GgufExporter.Export(BaseFolder, Adapter, path, type);
                _files[type] = path;
            }
            return path;
        }
    }

    /// <summary>qlora's float32 logits of every position of <paramref name="ids"/>: [positions, vocab].</summary>
    public float[][] ReferenceLogits(int[] ids)
    {
        var key = string.Join(',', ids);
        lock (_lock)
            if (_logits.TryGetValue(key, out var cached)) return cached;
        var rows = Logits.Of(Reference, ids);
        lock (_lock) _logits[key] = rows;
        return rows;
    }

    public static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !System.IO.File.Exists(Path.Combine(dir.FullName, "QLora.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("QLora.sln not found above the test binaries");
    }

    public void Dispose()
    {
        Reference.Dispose();
        Tokenizer.Dispose();
        try { Directory.Delete(Dir, recursive: true); } catch (IOException) { }
    }
}
