using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Random but valid weights of a Llama-family architecture, with the decoder projections generated directly in
/// bitsandbytes' 4-bit form (random NF4 codes, random per-block absmax around the value that gives elements a standard
/// deviation of <see cref="WeightStd"/>, double-quantized as bitsandbytes does) rather than by quantizing random floats,
/// so even a 70B model is generated in seconds per layer. Embeddings and lm_head are normal(0, WeightStd), norms one.
/// Deterministic: every tensor's values depend only on the seed and its name. Serves a model in memory
/// (<see cref="IModelWeights"/> + <see cref="IFourBitProjectionFactory"/>) or writes it as a bnb-4bit HF folder.
/// </summary>
public sealed class RandomFourBitModel : IModelWeights, IFourBitProjectionFactory
{
    private const int Blocksize = 64;
    private const string Generator = "qlora random-nf4 v1";
    private readonly Dictionary<string, (long[] Shape, bool FourBit)> _tensors = new(StringComparer.Ordinal);
    private readonly List<string> _order = [];

    /// <summary>The weights of <paramref name="config"/> drawn from <paramref name="seed"/>.</summary>
    public RandomFourBitModel(LlamaConfig config, ulong seed = 1, double weightStd = 0.02)
    {
        config.Validate();
        Config = config;
        Seed = seed;
        WeightStd = weightStd;
        int h = config.HiddenSize, i = config.IntermediateSize, q = config.NumAttentionHeads * config.HeadDim, kv = config.NumKeyValueHeads * config.HeadDim;
        Add("model.embed_tokens.weight", false, config.VocabSize, h);
        for (int l = 0; l < config.NumHiddenLayers; l++)
        {
            string p = $"model.layers.{l}.";
            Add(p + "input_layernorm.weight", false, h);
            foreach (var (name, outF, inF) in new[] { ("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q) })
            {
                Add($"{p}self_attn.{name}.weight", true, outF, inF);
                if (config.AttentionBias && (name != "o_proj" || !config.QkvBiasOnly)) Add($"{p}self_attn.{name}.bias", false, outF);
            }
            if (config.QkNorm)
            {
                Add(p + "self_attn.q_norm.weight", false, config.HeadDim);
                Add(p + "self_attn.k_norm.weight", false, config.HeadDim);
            }
            Add(p + "post_attention_layernorm.weight", false, h);
            if (config.Gemma is not null)
            {
                Add(p + "pre_feedforward_layernorm.weight", false, h);
                Add(p + "post_feedforward_layernorm.weight", false, h);
            }
            foreach (var (name, outF, inF) in new[] { ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i) })
            {
                Add($"{p}mlp.{name}.weight", true, outF, inF);
                if (config.MlpBias) Add($"{p}mlp.{name}.bias", false, outF);
            }
        }
        Add("model.norm.weight", false, h);
        if (!config.TieWordEmbeddings) Add("lm_head.weight", false, config.VocabSize, h);

        void Add(string name, bool fourBit, params long[] shape)
        {
            _tensors.Add(name, (shape, fourBit));
            _order.Add(name);
        }
    }

    /// <summary>The architecture.</summary>
    public LlamaConfig Config { get; }
    /// <summary>The seed every tensor is drawn from.</summary>
    public ulong Seed { get; }
    /// <summary>Standard deviation of the (dequantized) weights.</summary>
    public double WeightStd { get; }

    /// <summary>Bytes of the 4-bit projections (packed codes, absmax codes, nested absmax, with NF4 + double quantization).</summary>
    public long FourBitBytes => _tensors.Values.Where(t => t.FourBit).Sum(t =>
    {
        long n = TensorShape.ElementCount(t.Shape), blocks = (n + Blocksize - 1) / Blocksize;
        return (n + 1) / 2 + blocks + 4 * ((blocks + 255) / 256) + 4 * 256;
    });

    /// <summary>Bytes of the dense tensors in bf16.</summary>
    public long DenseBytes => _tensors.Values.Where(t => !t.FourBit).Sum(t => 2 * TensorShape.ElementCount(t.Shape));

    /// <inheritdoc />
    public bool Contains(string name) => _tensors.ContainsKey(name);

    /// <inheritdoc />
    public long[] Shape(string name) => (long[])Info(name).Shape.Clone();

    /// <inheritdoc />
    public Tensor Dense(string name)
    {
        var (shape, fourBit) = Info(name);
        if (fourBit) throw new InvalidDataException($"{name} is generated 4-bit; ask for it through FourBit or Create");
        if (name.EndsWith("norm.weight", StringComparison.Ordinal)) return ones(shape, dtype: ScalarType.BFloat16);
        var result = empty(shape, dtype: ScalarType.BFloat16);
        long rows = shape[0], chunk = Math.Max(1, (1L << 22) / Math.Max(1, shape.Length > 1 ? shape[1] : 1));
        var gen = new Generator(TensorSeed(name));
        for (long start = 0; start < rows; start += chunk)
        {
            long n = Math.Min(chunk, rows - start);
            using var values = DenseChunk(shape, n, gen);
            using var target = result.narrow(0, start, n);
            target.copy_(values);
        }
        return result;
    }

    /// <inheritdoc />
    public QuantizedTensor FourBit(string name, QuantType quantType, int blocksize, bool doubleQuant)
    {
        var shape = FourBitShape(name);
        var packed = GC.AllocateUninitializedArray<byte>(checked((int)((TensorShape.ElementCount(shape) + 1) / 2)));
        FillPacked(name, packed);
        return new QuantizedTensor(packed, State(name, quantType, blocksize, doubleQuant));
    }

    /// <summary>A <see cref="Linear4bit"/> whose packed codes are generated straight into its own buffer (NF4, blocksize 64, double quant).</summary>
    public Linear4bit Create(string weightName, long[] shape, Tensor? bias, ScalarType computeDType)
    {
        var own = FourBitShape(weightName);
        if (!own.SequenceEqual(shape)) throw new ArgumentException($"weight {weightName} has shape [{string.Join(", ", own)}], not [{string.Join(", ", shape)}]");
        var packed = empty((TensorShape.ElementCount(shape) + 1) / 2, dtype: ScalarType.Byte);
        unsafe { FillPacked(weightName, new Span<byte>((void*)TensorMemory.DataPointer(packed), checked((int)packed.numel()))); }
        return new Linear4bit(packed, State(weightName, QuantType.Nf4, Blocksize, doubleQuant: true), bias, computeDType);
    }

    /// <summary>Random NF4/FP4 codes for a weight (every byte value is two valid codes).</summary>
    public void FillPacked(string name, Span<byte> destination)
    {
        ulong s = TensorSeed(name) | 1;
        var words = MemoryMarshal.Cast<byte, ulong>(destination);
        for (int k = 0; k < words.Length; k++) words[k] = Next(ref s);
        Span<byte> tail = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(tail, Next(ref s));
        tail[..(destination.Length - words.Length * 8)].CopyTo(destination[(words.Length * 8)..]);
    }

    /// <summary>
    /// The quant state of a weight: per-block absmax drawn uniformly within ±25 % of the value that gives uniformly
    /// random codes a standard deviation of <see cref="WeightStd"/>, double-quantized when asked.
    /// </summary>
    public QuantState State(string name, QuantType quantType = QuantType.Nf4, int blocksize = Blocksize, bool doubleQuant = true)
    {
        var shape = FourBitShape(name);
        QuantTypes.ValidateBlocksize(blocksize);
        var absmax = Absmax(name, shape, quantType, blocksize);
        return new QuantState
        {
            QuantType = quantType, Blocksize = blocksize, DType = FloatType.BFloat16, Shape = shape,
            Absmax = doubleQuant ? null : absmax,
            Nested = doubleQuant ? DoubleQuantizer.Quantize(absmax) : null,
        };
    }

    /// <summary>
    /// Writes the model as a bnb-4bit Hugging Face folder (sharded safetensors + index, config.json with
    /// quantization_config, a byte-level tokenizer and a marker naming the generator), or keeps the folder when its
    /// marker shows it already holds exactly these weights. Returns true when it wrote.
    /// </summary>
    public bool WriteFolder(string folder, Action<string>? log = null)
    {
        const string format = "bnb-4bit";
        if (!StartFolder(folder, format, FourBitBytes + DenseBytes, log, out var marker)) return false;
        var config = ConfigJson();
        using var writer = new ShardedSafetensorsWriter(folder, metadata: new Dictionary<string, string> { ["format"] = "pt" });
        // Pass 1 lays the files out: a 4-bit weight's entries depend on its shape and, through the quant-state JSON,
        // on the double-quantization offset, which the absmax alone gives.
        foreach (var name in _order)
        {
            var (shape, fourBit) = _tensors[name];
            if (!fourBit) { writer.Declare(name, TensorDType.BF16, shape); continue; }
            var absmax = Absmax(name, shape, QuantType.Nf4, Blocksize);
            var layout = new QuantState
            {
                QuantType = QuantType.Nf4, Blocksize = Blocksize, DType = FloatType.BFloat16, Shape = shape,
                Nested = new NestedAbsmax { Codes = [], Absmax = [], Map = [], Offset = DoubleQuantizer.Offset(absmax) },
            };
            foreach (var slot in BnbCheckpointLayout.Describe(name, layout, out _)) writer.Declare(slot.Name, slot.DType, slot.Shape);
        }
        // Pass 2 writes tensor by tensor through one reused buffer, so memory stays at about the largest tensor.
        long largest = _tensors.Values.Where(t => t.FourBit).Select(t => (TensorShape.ElementCount(t.Shape) + 1) / 2).DefaultIfEmpty(0).Max();
        var buffer = GC.AllocateUninitializedArray<byte>(checked((int)largest));
        int written = 0;
        foreach (var name in _order)
        {
            var (shape, fourBit) = _tensors[name];
            if (!fourBit)
            {
                WriteDense(writer, name, shape);
                continue;
            }
            var packed = buffer.AsSpan(0, (int)((TensorShape.ElementCount(shape) + 1) / 2));
            FillPacked(name, packed);
            writer.Write(name, packed);
            foreach (var e in BnbCheckpointLayout.StateEntries(name, State(name))) writer.Write(e.Name, e.Data);
            if (++written % 7 == 0) log?.Invoke($"  {written / 7} of {Config.NumHiddenLayers} layers written");
        }
        writer.Commit();
        FinishFolder(folder, format, config, marker);
        return true;
    }

    /// <summary>
    /// Writes the model as the folder a user downloads from the Hub: every tensor dense bf16 (the decoder projections
    /// normal(0, <see cref="WeightStd"/>) like the embeddings, not the 4-bit values), split into safetensors shards of at
    /// most <paramref name="maxShardBytes"/> with an index, config.json without quantization_config, and a byte-level
    /// tokenizer. Kept as it is when its marker shows it holds these weights already. Returns true when it wrote.
    /// </summary>
    public bool WriteDenseFolder(string folder, long maxShardBytes = ShardedSafetensorsWriter.DefaultMaxShardBytes, Action<string>? log = null)
    {
        long total = _tensors.Values.Sum(t => 2 * TensorShape.ElementCount(t.Shape));
        string format = $"dense-bf16, shards of at most {maxShardBytes} bytes";
        if (!StartFolder(folder, format, total, log, out var marker)) return false;
        var config = ConfigJson();
        config.Remove("quantization_config");
        using var writer = new ShardedSafetensorsWriter(folder, maxShardBytes, metadata: new Dictionary<string, string> { ["format"] = "pt" });
        foreach (var name in _order) writer.Declare(name, TensorDType.BF16, _tensors[name].Shape);
        int written = 0;
        foreach (var name in _order)
        {
            var (shape, fourBit) = _tensors[name];
            WriteDense(writer, name, shape);
            if (fourBit && ++written % 7 == 0) log?.Invoke($"  {written / 7} of {Config.NumHiddenLayers} layers written");
        }
        writer.Commit();
        FinishFolder(folder, format, config, marker);
        return true;
    }

    /// <summary>The marker's text for a folder of <paramref name="format"/>: generator, seed, scale and architecture.</summary>
    private string MarkerText(string format) =>
        new JsonObject { ["generator"] = Generator, ["format"] = format, ["seed"] = Seed, ["weight_std"] = WeightStd, ["config"] = ConfigJson() }.ToJsonString();

    /// <summary>False when the folder already holds these weights; otherwise empties it (it is this generator's scratch) and checks the disk.</summary>
    private bool StartFolder(string folder, string format, long bytes, Action<string>? log, out string marker)
    {
        marker = Path.Combine(folder, MarkerFile);
        if (File.Exists(marker) && File.ReadAllText(marker) == MarkerText(format))
        {
            log?.Invoke($"reusing the random {format} checkpoint in {folder}");
            return false;
        }
        if (Directory.Exists(folder))
        {
            // Only a folder this generator made (its marker, complete or pending) or an empty one is ever emptied: a
            // folder of someone's real model (safetensors, no marker) is refused, never deleted.
            if (Directory.EnumerateFileSystemEntries(folder).Any() && !File.Exists(marker))
                throw new IOException($"{folder}: the folder holds files this generator did not write; choose an empty or new scratch folder");
            Directory.Delete(folder, recursive: true);
        }
        Directory.CreateDirectory(folder);
        File.WriteAllText(marker, PendingMarkerText); // first: a write killed half-way leaves a folder known to be ours
        long free = new DriveInfo(Path.GetFullPath(folder)).AvailableFreeSpace;
        if (free < bytes + (1L << 30))
            throw new IOException($"{folder}: writing the {bytes / 1e9:F1} GB checkpoint needs that much free disk plus 1 GB; {free / 1e9:F1} GB are free");
        log?.Invoke($"writing a random {format} checkpoint of {bytes / 1e9:F2} GB to {folder}");
        return true;
    }

    private void FinishFolder(string folder, string format, JsonObject config, string marker)
    {
        CheckpointQuantizer.WriteJson(Path.Combine(folder, "config.json"), config);
        ByteLevelTokenizerFiles.Write(folder);
        File.WriteAllText(marker, MarkerText(format)); // last: a folder without it is incomplete and is rewritten
    }

    private const string MarkerFile = "qlora-random-model.json";

    // The marker while the folder is being written: never equal to a finished folder's, so such a folder is rewritten.
    private const string PendingMarkerText = "{\"generator\":\"incomplete\"}";

    /// <summary>config.json of the architecture, with bitsandbytes' quantization_config (NF4, double quant, bf16 compute).</summary>
    public JsonObject ConfigJson()
    {
        var c = Config;
        bool qwen = c.Architecture == "Qwen2ForCausalLM";
        var json = new JsonObject
        {
            ["architectures"] = new JsonArray(c.Architecture),
            ["model_type"] = qwen ? "qwen2" : c.Architecture == "Qwen3ForCausalLM" ? "qwen3" : c.Architecture == "MistralForCausalLM" ? "mistral" : "llama",
            ["hidden_size"] = c.HiddenSize, ["intermediate_size"] = c.IntermediateSize, ["num_hidden_layers"] = c.NumHiddenLayers,
            ["num_attention_heads"] = c.NumAttentionHeads, ["num_key_value_heads"] = c.NumKeyValueHeads, ["head_dim"] = c.HeadDim,
            ["vocab_size"] = c.VocabSize, ["rms_norm_eps"] = c.RmsNormEps, ["rope_theta"] = c.RopeTheta,
            ["max_position_embeddings"] = c.MaxPositionEmbeddings, ["tie_word_embeddings"] = c.TieWordEmbeddings,
            ["attention_bias"] = c.AttentionBias, ["mlp_bias"] = c.MlpBias, ["torch_dtype"] = "bfloat16",
            ["quantization_config"] = new BnbQuantizationConfig { QuantType = QuantType.Nf4, DoubleQuant = true, ComputeDType = FloatType.BFloat16 }.ToJson(),
        };
        if (c.RopeScaling is { } r)
            json["rope_scaling"] = new JsonObject
            {
                ["rope_type"] = r.Type, ["factor"] = r.Factor, ["low_freq_factor"] = r.LowFreqFactor,
                ["high_freq_factor"] = r.HighFreqFactor, ["original_max_position_embeddings"] = r.OriginalMaxPositionEmbeddings,
            };
        // transformers' Mistral defaults an absent sliding_window to 4096, so "none" is written out; Qwen2 windows only
        // with use_sliding_window, on the layers layer_types names.
        if (c.SlidingWindow is not null || c.Architecture == "MistralForCausalLM") json["sliding_window"] = c.SlidingWindow;
        if (qwen && c.SlidingWindow is not null) json["use_sliding_window"] = true;
        if (c.LayerTypes is { } types) json["layer_types"] = new JsonArray(types.Select(t => (JsonNode?)t).ToArray());
        if (c.Gemma is { } g)
        {
            json["model_type"] = c.Architecture == "Gemma3ForCausalLM" ? "gemma3_text" : "gemma2";
            json["hidden_activation"] = "gelu_pytorch_tanh";
            json["query_pre_attn_scalar"] = g.QueryPreAttnScalar;
            json["attn_logit_softcapping"] = g.AttnLogitSoftcapping;
            json["final_logit_softcapping"] = g.FinalLogitSoftcapping;
            if (c.RopeByLayerType is { } byType) // transformers v5's per-type layout
            {
                json.Remove("rope_scaling");
                var rope = new JsonObject();
                foreach (var (type, p) in byType)
                {
                    var block = new JsonObject { ["rope_type"] = p.Scaling?.Type ?? "default", ["rope_theta"] = p.Theta };
                    if (p.Scaling is { } sc) block["factor"] = sc.Factor;
                    rope[type] = block;
                }
                json["rope_parameters"] = rope;
            }
        }
        return json;
    }

    private void WriteDense(ShardedSafetensorsWriter writer, string name, long[] shape)
    {
        if (name.EndsWith("norm.weight", StringComparison.Ordinal) || shape.Length == 1)
        {
            using var t = Dense(name);
            writer.Write(name, t.bytes);
            return;
        }
        long rows = shape[0], chunk = Math.Max(1, (1L << 22) / shape[1]);
        var gen = new Generator(TensorSeed(name));
        for (long start = 0; start < rows; start += chunk)
        {
            using var values = DenseChunk(shape, Math.Min(chunk, rows - start), gen);
            using var bf16 = values.to(ScalarType.BFloat16);
            writer.Append(name, bf16.bytes);
        }
    }

    /// <summary>The next <paramref name="rows"/> rows of a dense tensor, float32 (chunks drawn in order reproduce the whole).</summary>
    private Tensor DenseChunk(long[] shape, long rows, Generator gen)
    {
        long[] chunkShape = [rows, .. shape.Skip(1)];
        using var values = randn(chunkShape, generator: gen);
        return values.mul(WeightStd);
    }

    private float[] Absmax(string name, long[] shape, QuantType quantType, int blocksize)
    {
        long blocks = (TensorShape.ElementCount(shape) + blocksize - 1) / blocksize;
        double rms = Math.Sqrt(quantType.Table().ToArray().Average(v => (double)v * v));
        float center = (float)(WeightStd / rms);
        var absmax = new float[blocks];
        ulong s = TensorSeed(name + "#absmax") | 1;
        for (long b = 0; b < blocks; b++)
        {
            double u = (Next(ref s) >> 11) * (1.0 / (1UL << 53)); // [0, 1)
            absmax[b] = center * (float)(0.75 + 0.5 * u);
        }
        return absmax;
    }

    private long[] FourBitShape(string name)
    {
        var (shape, fourBit) = Info(name);
        if (!fourBit) throw new InvalidDataException($"{name} is a dense tensor of the random model, not a 4-bit weight");
        return (long[])shape.Clone();
    }

    private (long[] Shape, bool FourBit) Info(string name) =>
        _tensors.TryGetValue(name, out var t) ? t : throw new ArgumentException($"missing weight {name}");

    private ulong TensorSeed(string name)
    {
        ulong h = 14695981039346656037UL ^ Seed;
        foreach (byte b in Encoding.UTF8.GetBytes(name)) h = (h ^ b) * 1099511628211UL;
        return h;
    }

    private static ulong Next(ref ulong s) // xorshift64*
    {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        return s * 2685821657736338717UL;
    }
}
