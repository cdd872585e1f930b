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
        /// <summary>
        /// Quantize dense projections (a bnb-4bit checkpoint's are 4-bit already and kept as stored). False: plain LoRA's
        /// 16-bit base, every projection a frozen dense Linear in the compute dtype; a bnb-4bit checkpoint is then
        /// dequantized on load (its 4-bit rounding stays in the weights).
        /// </summary>
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
        /// Keep the input embedding table of an untied model in host memory, read in place from the memory-mapped
        /// checkpoint; only the rows a batch uses reach the device (see <see cref="FrozenEmbedding.OnHost"/>).
        /// </summary>
        public bool HostEmbedding { get; init; } = true;
        /// <summary>What to do with a stored weight holding NaN or infinity (checked before anything is built).</summary>
        public NonFinitePolicy NonFinite { get; init; } = NonFinitePolicy.Stop;
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

        if (options.Streaming && !options.Quantize)
            throw new ArgumentException($"{folder}: layer streaming reads 4-bit weights, and this load keeps the base 16-bit (Quantization:QuantType none); turn streaming off or quantize the base");
        if (options.Streaming && bnb is null)
            throw new ArgumentException($"{folder}: layer streaming reads a bnb-4bit checkpoint, and this folder has no quantization_config (quantize it first with 'qlora quantize')");
        var checkpoint = SafetensorsCheckpoint.Open(folder);
        LayerStreamer? streamer = null;
        bool mapped = false;
        try
        {
            long stored = checkpoint.Tensors.Sum(t => t.ByteLength);
            log?.Invoke($"weights: {checkpoint.Tensors.Count} tensors, {stored / 1e6:F1} MB in {checkpoint.Shards.Count} file(s), memory-mapped");
            NonFiniteValues.Check(folder, checkpoint.Tensors, n => checkpoint.GetSpan(n), options.NonFinite, log, "set Model:NonFiniteWeights to warn");
            if (options.Streaming) streamer = new LayerStreamer(checkpoint, config.NumHiddenLayers, options.StreamWindow, options.Device);
            var model = LlamaForCausalLM.FromWeights(config, new SafetensorsModelWeights(checkpoint), options.Quantize,
                options.ComputeDType, options.Blocksize, options.QuantType, options.DoubleQuant, streamer,
                keepDense: bnb is { SkipModules: not null } ? bnb.SkipsModule : null, // llm_int8_skip_modules stay 16-bit, as transformers keeps them
                hostEmbedding: options.HostEmbedding, device: options.Device);
            if (bnb is not null && !options.Quantize)
                log?.Invoke($"the base is stored 4-bit ({bnb.QuantType.Name()}); it was dequantized to {options.ComputeDType} on load, so its 4-bit rounding stays in the weights");
            if (model.model.embed_tokens.IsOnHost && streamer is null)
            {
                model.HostMemory = checkpoint; // the embedding reads the mapped file: the model keeps it open
                mapped = true;
            }
            long quantized = model.named_modules().Select(m => m.module).OfType<Linear4bit>().Distinct().Sum(l => l.QuantizedBytes);
            long dense = model.named_parameters().Sum(p => p.parameter.numel() * p.parameter.element_size());
            var embedding = model.model.embed_tokens;
            // Quantizing on load leaves the managed arrays of every weight behind: give them back before training starts.
            ManagedHeap.ReturnFreeMemory();
            log?.Invoke($"model{(options.Device is { type: not DeviceType.CPU } d ? $" on {d}" : "")}: {quantized / 1e6:F1} MB of 4-bit projections{(streamer is null ? "" : $" streamed from disk (at most {streamer.Window} layers of {streamer.LargestLayerBytes / 1e6:F1} MB resident)")} + {dense / 1e6:F1} MB dense ({options.ComputeDType}){(embedding.IsOnHost ? $"; the {embedding.Table.numel() * embedding.Table.element_size() / 1e6:F1} MB input embedding is read in place from the memory-mapped checkpoint" : "")} in {sw.Elapsed.TotalSeconds:F1} s");
            return model;
        }
        catch
        {
            streamer?.Dispose(); // closes the checkpoint too; without a streamer, finally closes it
            throw;
        }
        finally
        {
            if (streamer is null && !mapped) checkpoint.Dispose();
        }
    }
}
