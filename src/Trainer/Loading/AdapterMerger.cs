using System.Text.Json.Nodes;
using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Writes a standalone Hugging Face model folder with a PEFT LoRA adapter merged in (<c>W + scaling·B·A</c> for every
/// adapted projection), tensor by tensor (through <see cref="MergedWeights"/>) so memory stays bounded by the largest tensor. The base may be dense or a
/// bnb-4bit checkpoint (its projections are dequantized before merging). Optionally re-quantizes the result to a
/// bnb-4bit folder. The output folder appears only when complete.
/// </summary>
public static class AdapterMerger
{
    /// <summary>What a merge did.</summary>
    public sealed record Report(int Merged, int Copied, long OutputBytes);

    /// <summary>Merges <paramref name="adapterFolder"/> into <paramref name="baseFolder"/>, writing <paramref name="outputFolder"/>.</summary>
    public static Report Merge(string baseFolder, string adapterFolder, string outputFolder, FloatType dtype = FloatType.BFloat16,
        bool quantize = false, bool overwrite = false, Action<string>? log = null, long maxShardBytes = ShardedSafetensorsWriter.DefaultMaxShardBytes)
    {
        PathOverlap.Refuse("output", outputFolder, ("base", baseFolder), ("adapter", adapterFolder));
        var configPath = Path.Combine(baseFolder, "config.json");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{baseFolder}: no config.json, so not a Hugging Face model folder", configPath);
        LlamaConfig.Load(configPath); // refuses unsupported architectures and inconsistent shapes up front
        var rawConfig = (JsonObject)JsonNode.Parse(File.ReadAllText(configPath))!;
        var baseSkipModules = BnbQuantizationConfig.FromConfig(rawConfig)?.SkipModules;

        using var source = MergedWeights.Open(baseFolder, adapterFolder); // checks the adapter in full (AdapterCheck) before anything is written
        var options = source.Options!;

        using var output = StagedFolder.Create(outputFolder, overwrite);
        // With re-quantization, the dense merge goes to a second staging folder that is never committed.
        using var denseStage = quantize ? StagedFolder.Create(output.Path + "-dense", overwrite: false) : null;
        var dense = denseStage?.Path ?? output.Path;
        int merged = 0, copied = 0;
        using (var writer = new ShardedSafetensorsWriter(dense, maxShardBytes, new Dictionary<string, string> { ["format"] = "pt" }))
        {
            foreach (var name in source.Names)
                writer.Declare(name, source.IsFloating(name) ? dtype.ToTensorDType() : source.Checkpoint.GetInfo(name).DType, source.Shape(name));
            foreach (var name in source.Names)
            {
                if (!source.IsFloating(name))
                {
                    writer.Write(name, source.Checkpoint.GetSpan(name));
                    copied++;
                    continue;
                }
                using var scope = NewDisposeScope();
                var w = source.Float32(name);
                if (source.IsAdapted(name)) merged++;
                else copied++;
                var converted = w.to(TorchDTypes.ToScalarType(dtype)).contiguous();
                writer.Write(name, converted.bytes);
            }
            writer.Commit();
        }

        rawConfig.Remove("quantization_config");
        rawConfig["torch_dtype"] = dtype.Name();
        CheckpointQuantizer.WriteJson(Path.Combine(dense, "config.json"), rawConfig);
        CheckpointQuantizer.CopySideFiles(baseFolder, dense);
        log?.Invoke($"merged {merged} projections ({(options.UseDora ? "DoRA, " : "")}scaling {options.Scaling}{(options.RankPattern.Count + options.AlphaPattern.Count > 0 ? " by default, rank_pattern / alpha_pattern elsewhere" : "")}), copied {copied} tensors, {dtype.Name()}");
        // Re-quantized, the modules the base kept dense (llm_int8_skip_modules) stay dense.
        if (quantize) CheckpointQuantizer.QuantizeFolder(dense, output.Path, new QuantizeOptions { SkipModules = baseSkipModules }, log, overwrite: true);
        output.Commit();
        long outBytes = Directory.EnumerateFiles(output.Target).Sum(f => new FileInfo(f).Length);
        return new Report(merged, copied, outBytes);
    }
}
