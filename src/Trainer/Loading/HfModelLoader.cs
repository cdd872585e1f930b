using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Loads a Hugging Face model folder (config.json + model.safetensors or index + shards) of a Llama, Mistral or Qwen2
/// model as the QLoRA base: projections quantized to NF4 + double quantization tensor by tensor from the memory-mapped
/// files (peak ≈ the quantized model + one tensor, never a 16-bit copy of the model), or taken as stored from a
/// bitsandbytes 4-bit checkpoint.
/// </summary>
public static class HfModelLoader
{
    /// <summary>How to load.</summary>
    public sealed record Options
    {
        /// <summary>Quantize dense projections (ignored for bnb-4bit checkpoints, which are 4-bit already).</summary>
        public bool Quantize { get; init; } = true;
        /// <summary>Compute dtype.</summary>
        public ScalarType ComputeDType { get; init; } = ScalarType.BFloat16;
        /// <summary>Blocksize when quantizing on load.</summary>
        public int Blocksize { get; init; } = 64;
        /// <summary>NF4 or FP4 when quantizing on load.</summary>
        public QuantType QuantType { get; init; } = QuantType.Nf4;
        /// <summary>Double quantization when quantizing on load.</summary>
        public bool DoubleQuant { get; init; } = true;
        /// <summary>
        /// Stream the decoder layers' 4-bit weights from the memory-mapped checkpoint (a bnb-4bit folder) instead of
        /// loading them: see <see cref="LayerStreamer"/>.
        /// </summary>
        public bool Streaming { get; init; }
        /// <summary>Most decoder layers resident at once when streaming (2: the current one and the prefetched one).</summary>
        public int StreamWindow { get; init; } = 2;
        /// <summary>
        /// The device the model is placed on (null: the CPU). Each tensor is read, quantized on the CPU and moved there
        /// on its own, so host memory never holds the whole model on its way to a GPU.
        /// </summary>
        public Device? Device { get; init; }
    }

    /// <summary>Loads the model in <paramref name="folder"/>; errors name the file, field or tensor that is wrong.</summary>
    public static LlamaForCausalLM Load(string folder, Options? options = null, Action<string>? log = null)
    {
        options ??= new Options();
        if (!Directory.Exists(folder)) throw new DirectoryNotFoundException($"{folder}: no such model folder");
        var configPath = Path.Combine(folder, "config.json");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{folder}: no config.json, so not a Hugging Face model folder", configPath);
        var sw = Stopwatch.StartNew();
        var config = LlamaConfig.Load(configPath);
        JsonObject raw;
        try { raw = (JsonObject)JsonNode.Parse(File.ReadAllText(configPath))!; }
        catch (JsonException e) { throw new FormatException($"{configPath}: {e.Message}"); }
        var bnb = BnbQuantizationConfig.FromConfig(raw);
        log?.Invoke($"config: {config.Architecture}, {config.NumHiddenLayers} layers, hidden {config.HiddenSize}, vocab {config.VocabSize}{(bnb is null ? "" : $", bitsandbytes {bnb.QuantType.Name()} checkpoint")}");

        if (options.Streaming && bnb is null)
            throw new ArgumentException($"{folder}: layer streaming reads a bnb-4bit checkpoint, and this folder has no quantization_config (quantize it first with 'qlora quantize')");
        var checkpoint = SafetensorsCheckpoint.Open(folder);
        LayerStreamer? streamer = null;
        try
        {
            long stored = checkpoint.Tensors.Sum(t => t.ByteLength);
            log?.Invoke($"weights: {checkpoint.Tensors.Count} tensors, {stored / 1e6:F1} MB in {checkpoint.Shards.Count} file(s), memory-mapped");
            if (options.Streaming) streamer = new LayerStreamer(checkpoint, config.NumHiddenLayers, options.StreamWindow);
            var model = LlamaForCausalLM.FromWeights(config, new SafetensorsModelWeights(checkpoint), options.Quantize || bnb is not null,
                options.ComputeDType, options.Blocksize, options.QuantType, options.DoubleQuant, streamer,
                keepDense: bnb is { SkipModules: not null } ? bnb.SkipsModule : null, // llm_int8_skip_modules stay 16-bit, as transformers keeps them
                device: options.Device);
            long quantized = model.named_modules().Select(m => m.module).OfType<Linear4bit>().Distinct().Sum(l => l.QuantizedBytes);
            long dense = model.named_parameters().Sum(p => p.parameter.numel() * p.parameter.element_size());
            log?.Invoke($"model{(options.Device is { type: not DeviceType.CPU } d ? $" on {d}" : "")}: {quantized / 1e6:F1} MB of 4-bit projections{(streamer is null ? "" : $" streamed from disk (at most {streamer.Window} layers of {streamer.LargestLayerBytes / 1e6:F1} MB resident)")} + {dense / 1e6:F1} MB dense ({options.ComputeDType}) in {sw.Elapsed.TotalSeconds:F1} s");
            return model;
        }
        catch
        {
            streamer?.Dispose(); // closes the checkpoint too; without a streamer, finally closes it
            throw;
        }
        finally
        {
            if (streamer is null) checkpoint.Dispose();
        }
    }
}
