using System.Text.Json.Nodes;
using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Writes a standalone Hugging Face model folder with a PEFT LoRA adapter merged in (<c>W + scaling·B·A</c> for every
/// adapted projection), tensor by tensor so memory stays bounded by the largest tensor. The base may be dense or a
/// bnb-4bit checkpoint (its projections are dequantized before merging). Optionally re-quantizes the result to a
/// bnb-4bit folder. The output folder appears only when complete.
/// </summary>
public static class AdapterMerger
{
    /// <summary>What a merge did.</summary>
    public sealed record Report(int Merged, int Copied, long OutputBytes);

    private const string Prefix = "base_model.model.";

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

        var options = PeftAdapter.ReadOptions(adapterFolder);
        var adapterPath = Path.Combine(adapterFolder, PeftAdapter.WeightsFile);
        if (!File.Exists(adapterPath)) throw new FileNotFoundException($"{adapterFolder}: no {PeftAdapter.WeightsFile}", adapterPath);
        using var adapter = SafetensorsReader.Open(adapterPath);
        using var checkpoint = SafetensorsCheckpoint.Open(baseFolder);
        var weights = new SafetensorsModelWeights(checkpoint);
        var projections = checkpoint.Tensors.Select(t => t.Name)
            .Where(n => !BnbCheckpointLayout.IsAuxiliaryKey(n) && n.StartsWith("model.layers.", StringComparison.Ordinal) && n.EndsWith(".weight", StringComparison.Ordinal))
            .Select(n => (Module: n[..^".weight".Length], Shape: weights.Shape(n))).Where(p => p.Shape.Length == 2)
            .ToDictionary(p => p.Module, p => p.Shape, StringComparer.Ordinal);
        AdapterCheck.Verify(adapterPath, options, projections); // every tensor, shape and value, before anything is written

        // Which weights get a delta: every module the adapter carries, checked against the base.
        var deltas = new Dictionary<string, string>(StringComparer.Ordinal); // weight key -> module
        foreach (var t in adapter.Tensors)
        {
            if (!t.Name.StartsWith(Prefix, StringComparison.Ordinal) || !t.Name.EndsWith(".lora_A.weight", StringComparison.Ordinal)) continue;
            var module = t.Name[Prefix.Length..^".lora_A.weight".Length];
            if (!weights.Contains(module + ".weight"))
                throw new InvalidDataException($"{adapterPath}: {t.Name} targets {module}, which the base model does not have");
            deltas[module + ".weight"] = module;
        }
        if (deltas.Count == 0) throw new InvalidDataException($"{adapterPath}: no lora_A/lora_B tensors");

        using var output = StagedFolder.Create(outputFolder, overwrite);
        // With re-quantization, the dense merge goes to a second staging folder that is never committed.
        using var denseStage = quantize ? StagedFolder.Create(output.Path + "-dense", overwrite: false) : null;
        var dense = denseStage?.Path ?? output.Path;
        int merged = 0, copied = 0;
        var names = checkpoint.Tensors.Select(t => t.Name).Where(n => !BnbCheckpointLayout.IsAuxiliaryKey(n)).ToList();
        using (var writer = new ShardedSafetensorsWriter(dense, maxShardBytes, new Dictionary<string, string> { ["format"] = "pt" }))
        {
            foreach (var name in names)
            {
                var info = checkpoint.GetInfo(name);
                bool floating = BnbCheckpointLayout.IsQuantized(checkpoint, name) || FloatTypes.FromTensorDType(info.DType) is not null;
                writer.Declare(name, floating ? dtype.ToTensorDType() : info.DType, weights.Shape(name));
            }
            foreach (var name in names)
            {
                using var scope = NewDisposeScope();
                Tensor w;
                if (BnbCheckpointLayout.IsQuantized(checkpoint, name))
                {
                    // As PEFT merges a bnb layer: dequantize_4bit gives quant_state.dtype (usually bf16), then the delta is added.
                    var q = BnbCheckpointLayout.Read(checkpoint, name);
                    w = empty(q.State.Shape, dtype: TorchDTypes.ToScalarType(q.State.DType));
                    FourBitDequantizer.Dequantize(q, q.State.DType, w.bytes);
                }
                else if (FloatTypes.FromTensorDType(checkpoint.GetInfo(name).DType) is not null)
                {
                    w = weights.Dense(name);
                }
                else
                {
                    writer.Write(name, checkpoint.GetSpan(name));
                    copied++;
                    continue;
                }
                if (deltas.TryGetValue(name, out var module))
                {
                    var a = ReadAdapter(adapter, $"{Prefix}{module}.lora_A.weight");
                    var b = ReadAdapter(adapter, $"{Prefix}{module}.lora_B.weight");
                    if (a.shape[0] != b.shape[1] || b.shape[0] != w.shape[0] || a.shape[1] != w.shape[1])
                        throw new InvalidDataException($"{adapterPath}: {module} has A [{string.Join(", ", a.shape)}] and B [{string.Join(", ", b.shape)}], which do not fit the base weight [{string.Join(", ", w.shape)}]");
                    var own = options.ForModule(module); // rank_pattern / alpha_pattern
                    if (a.shape[0] != own.Rank)
                        throw new InvalidDataException($"{adapterPath}: {module} has rank {a.shape[0]}, adapter_config.json gives it rank {own.Rank} (r / rank_pattern)");
                    w = w.to(ScalarType.Float32) + b.matmul(a) * own.Scaling;
                    merged++;
                }
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
        log?.Invoke($"merged {merged} projections (scaling {options.Scaling}{(options.RankPattern.Count + options.AlphaPattern.Count > 0 ? " by default, rank_pattern / alpha_pattern elsewhere" : "")}), copied {copied} tensors, {dtype.Name()}");
        // Re-quantized, the modules the base kept dense (llm_int8_skip_modules) stay dense.
        if (quantize) CheckpointQuantizer.QuantizeFolder(dense, output.Path, new QuantizeOptions { SkipModules = baseSkipModules }, log, overwrite: true);
        output.Commit();
        long outBytes = Directory.EnumerateFiles(output.Target).Sum(f => new FileInfo(f).Length);
        return new Report(merged, copied, outBytes);
    }

    private static Tensor ReadAdapter(SafetensorsReader reader, string key)
    {
        if (!reader.Contains(key)) throw new InvalidDataException($"{reader.Path}: no {key}");
        return TorchDTypes.FromBytes(reader.GetSpan(key), reader.GetInfo(key)).to(ScalarType.Float32);
    }
}
