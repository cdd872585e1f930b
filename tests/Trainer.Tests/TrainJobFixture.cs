using System.Text.Json.Nodes;

namespace QLora.Trainer.Tests;

/// <summary>A tiny HF model folder with a byte-level tokenizer and Llama 3 chat template, plus job files, for training-job tests.</summary>
internal static class TrainJobFixture
{
    public const int Vocab = TokenizerFixtures.EotId + 1;

    /// <summary>Writes the model into <paramref name="dir"/>.</summary>
    public static void WriteModel(string dir, int layers = 2, int hidden = 32)
    {
        HfModelLoaderTests.WriteFolder(dir, TinyLlama.Config(layers: layers, hidden: hidden, vocab: Vocab));
        var tok = TokenizerFixtures.WriteByteLevelFolder();
        foreach (var f in Directory.GetFiles(tok)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)), overwrite: true);
        Directory.Delete(tok, recursive: true);
    }

    /// <summary>Instruction samples "add a b" → "a+b", deterministic.</summary>
    public static void WriteAdditionData(string path, int count, int seed)
    {
        var rng = new Random(seed);
        var lines = new List<string>();
        for (int i = 0; i < count; i++)
        {
            int a = rng.Next(10), b = rng.Next(10);
            lines.Add(new JsonObject { ["instruction"] = "add", ["input"] = $"{a} {b}", ["output"] = $"{a + b}" }.ToJsonString());
        }
        File.WriteAllLines(path, lines);
    }

    /// <summary>A job file in <paramref name="dir"/> training the fixture model; <paramref name="extra"/> adds or replaces keys.</summary>
    public static string WriteJob(string dir, Action<JsonObject>? extra = null)
    {
        WriteModel(Path.Combine(dir, "model"));
        WriteAdditionData(Path.Combine(dir, "train.jsonl"), 48, 1);
        WriteAdditionData(Path.Combine(dir, "eval.jsonl"), 8, 2);
        var job = new JsonObject
        {
            ["Model"] = new JsonObject { ["Path"] = "model", ["ComputeDType"] = "float32" },
            ["Lora"] = new JsonObject { ["Rank"] = 4, ["Alpha"] = 8 },
            ["Data"] = new JsonObject { ["TrainFile"] = "train.jsonl", ["EvalFile"] = "eval.jsonl", ["MaxSeqLength"] = 64 },
            ["Training"] = new JsonObject { ["MaxSteps"] = 6, ["MicroBatchSize"] = 2, ["GradientAccumulationSteps"] = 2, ["LearningRate"] = 0.01, ["WarmupSteps"] = 1, ["Seed"] = 7 },
            ["Eval"] = new JsonObject { ["EveryNSteps"] = 3, ["ExactMatch"] = true, ["MaxNewTokens"] = 4 },
            ["Output"] = new JsonObject { ["Dir"] = "out", ["SaveEveryNSteps"] = 2, ["KeepLast"] = 5 },
        };
        extra?.Invoke(job);
        var path = Path.Combine(dir, "job.json");
        File.WriteAllText(path, job.ToJsonString());
        return path;
    }
}
