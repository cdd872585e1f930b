using QLora.Quant;
using QLora.Quant.Gguf;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Writes a Llama-family model (a dense or bnb-4bit base, optionally with a PEFT LoRA adapter merged in) as one GGUF
/// file that llama.cpp, Ollama and LM Studio load: llama.cpp's metadata and tensor names, the Q/K row order its
/// <c>llama</c> architecture rotates, the tokenizer and chat template, and each tensor in the type llama.cpp's
/// converter or quantizer would give it. Tensors are merged, converted and written one at a time (no 16-bit copy of
/// the model on disk or in memory); the file appears only when complete.
/// </summary>
public static class GgufExporter
{
    /// <summary>What an export wrote.</summary>
    /// <param name="Tensors">Tensors written.</param>
    /// <param name="Merged">Weights the adapter changed.</param>
    /// <param name="OutputBytes">Size of the file.</param>
    /// <param name="TypeCounts">Tensors per ggml type.</param>
    public sealed record Report(int Tensors, int Merged, long OutputBytes, IReadOnlyDictionary<GgmlType, int> TypeCounts);

    /// <summary>
    /// Exports <paramref name="baseFolder"/> (+ <paramref name="adapterFolder"/>) to <paramref name="outputFile"/> as
    /// <paramref name="type"/>. An existing output is refused unless <paramref name="overwrite"/>; an output that is one
    /// of the inputs is always refused.
    /// </summary>
    public static Report Export(string baseFolder, string? adapterFolder, string outputFile, GgufFileType type, bool overwrite = false, Action<string>? log = null)
    {
        var configPath = Path.Combine(baseFolder, "config.json");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{baseFolder}: no config.json, so not a Hugging Face model folder", configPath);
        var config = LlamaConfig.Load(configPath);
        var full = Path.GetFullPath(outputFile);
        if (Directory.Exists(full)) throw new IOException($"{outputFile}: is a folder; the output must be a .gguf file path");
        foreach (var input in new[] { baseFolder, adapterFolder }.OfType<string>())
        {
            var inputFull = Path.GetFullPath(input).TrimEnd(Path.DirectorySeparatorChar) + Path.DirectorySeparatorChar;
            if (full.StartsWith(inputFull, StringComparison.Ordinal) && File.Exists(full))
                throw new IOException($"{outputFile}: is inside the input folder {input} and exists; write the GGUF file elsewhere");
        }
        if (File.Exists(full) && !overwrite) throw new IOException($"{outputFile}: exists; pass --overwrite to replace it, or choose another --output");
        var outDir = Path.GetDirectoryName(full)!;
        if (!Directory.Exists(outDir)) throw new DirectoryNotFoundException($"{outputFile}: the folder {outDir} does not exist");

        string arch = config.Architecture == "Qwen2ForCausalLM" ? "qwen2" : "llama";
        using var source = MergedWeights.Open(baseFolder, adapterFolder);
        var plan = PlanTensors(source, config, arch, type);

        using var writer = new GgufWriter(full);
        AddModelMetadata(writer, config, arch, type, Path.GetFileName(Path.GetFullPath(baseFolder).TrimEnd(Path.DirectorySeparatorChar)));
        GgufTokenizer.AddTo(writer, baseFolder, config.VocabSize);
        foreach (var t in plan) writer.Declare(t.GgufName, t.Type, t.Shape);
        int merged = 0;
        foreach (var t in plan)
        {
            using var scope = NewDisposeScope();
            Tensor w = t.Source is null ? RopeFactors(config) : source.Float32(t.Source);
            if (t.Source is not null && source.IsAdapted(t.Source)) merged++;
            if (t.PermuteHeads > 0) w = PermuteForLlamaRope(w, t.PermuteHeads);
            w = w.contiguous();
            WriteRows(writer, t, w);
        }
        writer.Commit();
        var counts = plan.GroupBy(t => t.Type).ToDictionary(g => g.Key, g => g.Count());
        log?.Invoke($"{plan.Count} tensors ({string.Join(", ", counts.OrderBy(c => c.Key).Select(c => $"{c.Value} {c.Key.Name()}"))}), {merged} merged with the adapter");
        return new Report(plan.Count, merged, new FileInfo(full).Length, counts);
    }

    /// <summary>
    /// llama.cpp's <c>llama</c> architecture rotates adjacent pairs, Hugging Face rotates halves: within each head of
    /// <c>d</c> rows, new row 2i = old row i and new row 2i+1 = old row d/2 + i. Works for weights and biases.
    /// </summary>
    public static Tensor PermuteForLlamaRope(Tensor w, int heads)
    {
        long rows = w.shape[0];
        var rest = w.shape.Skip(1).ToArray();
        return w.reshape([heads, 2, rows / heads / 2, .. rest]).transpose(1, 2).reshape(w.shape);
    }

    /// <summary>llama.cpp's tensor name for a Hugging Face weight name, or null for names it does not keep.</summary>
    public static string? GgufName(string hfName)
    {
        switch (hfName)
        {
            case "model.embed_tokens.weight": return "token_embd.weight";
            case "model.norm.weight": return "output_norm.weight";
            case "lm_head.weight": return "output.weight";
        }
        const string layers = "model.layers.";
        if (!hfName.StartsWith(layers, StringComparison.Ordinal)) return null;
        int dot = hfName.IndexOf('.', layers.Length);
        if (dot < 0 || !int.TryParse(hfName.AsSpan(layers.Length, dot - layers.Length), out int layer)) return null;
        string rest = hfName[(dot + 1)..];
        string? suffix = rest switch
        {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "self_attn.q_proj.bias" => "attn_q.bias",
            "self_attn.k_proj.bias" => "attn_k.bias",
            "self_attn.v_proj.bias" => "attn_v.bias",
            "self_attn.o_proj.bias" => "attn_output.bias",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            "mlp.gate_proj.bias" => "ffn_gate.bias",
            "mlp.up_proj.bias" => "ffn_up.bias",
            "mlp.down_proj.bias" => "ffn_down.bias",
            _ => null,
        };
        return suffix is null ? null : $"blk.{layer}.{suffix}";
    }

    private sealed record Planned(string GgufName, string? Source, GgmlType Type, long[] Shape, int PermuteHeads);

    private static List<Planned> PlanTensors(MergedWeights source, LlamaConfig config, string arch, GgufFileType type)
    {
        bool tied = !source.Names.Contains("lm_head.weight");
        bool seventyB = arch == "llama" && config.NumHiddenLayers == 80 && config.NumKeyValueHeads != config.NumAttentionHeads;
        var plan = new List<Planned>();
        foreach (var name in source.Names)
        {
            if (name.EndsWith("rotary_emb.inv_freq", StringComparison.Ordinal)) continue; // recomputed by llama.cpp
            var gguf = GgufName(name) ?? throw new InvalidDataException($"{source.Checkpoint.Path}: tensor {name} has no llama.cpp equivalent");
            if (!source.IsFloating(name)) throw new InvalidDataException($"{source.Checkpoint.Path}: tensor {name} is not floating-point");
            var shape = source.Shape(name);
            int layer = gguf.StartsWith("blk.", StringComparison.Ordinal) ? int.Parse(gguf.AsSpan(4, gguf.IndexOf('.', 4) - 4)) : -1;
            int permute = arch != "llama" ? 0
                : gguf.Contains(".attn_q.", StringComparison.Ordinal) ? config.NumAttentionHeads
                : gguf.Contains(".attn_k.", StringComparison.Ordinal) ? config.NumKeyValueHeads
                : 0;
            plan.Add(new Planned(gguf, name, type.TensorType(gguf, shape, layer, config.NumHiddenLayers, tied, seventyB), shape, permute));
        }
        if (config.RopeScaling is { Type: "llama3" })
            plan.Add(new Planned("rope_freqs.weight", null, GgmlType.F32, [config.HeadDim / 2], 0));
        // llama.cpp's quantizer order: tensors outside the blocks first, then block by block, each by name.
        return plan.OrderBy(t => t.GgufName.StartsWith("blk.", StringComparison.Ordinal) ? int.Parse(t.GgufName.AsSpan(4, t.GgufName.IndexOf('.', 4) - 4)) : -1)
            .ThenBy(t => t.GgufName, StringComparer.Ordinal).ToList();
    }

    private static void AddModelMetadata(GgufWriter w, LlamaConfig c, string arch, GgufFileType type, string name)
    {
        w.Add("general.architecture", GgufValue.String(arch));
        w.Add("general.type", GgufValue.String("model"));
        w.Add("general.name", GgufValue.String(name));
        w.Add("general.file_type", GgufValue.UInt32(type.LlamaFType()));
        if (type.IsQuantized()) w.Add("general.quantization_version", GgufValue.UInt32(2));
        w.Add($"{arch}.block_count", GgufValue.UInt32((uint)c.NumHiddenLayers));
        w.Add($"{arch}.context_length", GgufValue.UInt32((uint)c.MaxPositionEmbeddings));
        w.Add($"{arch}.embedding_length", GgufValue.UInt32((uint)c.HiddenSize));
        w.Add($"{arch}.feed_forward_length", GgufValue.UInt32((uint)c.IntermediateSize));
        w.Add($"{arch}.attention.head_count", GgufValue.UInt32((uint)c.NumAttentionHeads));
        w.Add($"{arch}.attention.head_count_kv", GgufValue.UInt32((uint)c.NumKeyValueHeads));
        w.Add($"{arch}.rope.freq_base", GgufValue.Float32((float)c.RopeTheta));
        w.Add($"{arch}.attention.layer_norm_rms_epsilon", GgufValue.Float32((float)c.RmsNormEps));
        w.Add($"{arch}.rope.dimension_count", GgufValue.UInt32((uint)c.HeadDim));
        w.Add($"{arch}.attention.key_length", GgufValue.UInt32((uint)c.HeadDim));
        w.Add($"{arch}.attention.value_length", GgufValue.UInt32((uint)c.HeadDim));
        w.Add($"{arch}.vocab_size", GgufValue.UInt32((uint)c.VocabSize));
        if (c.RopeScaling is { Type: "linear" } linear)
        {
            w.Add($"{arch}.rope.scaling.type", GgufValue.String("linear"));
            w.Add($"{arch}.rope.scaling.factor", GgufValue.Float32((float)linear.Factor));
        }
        // llama3 scaling travels as the rope_freqs.weight tensor (per-frequency factors), as llama.cpp's converter writes it.
    }

    /// <summary>Llama 3.1's per-frequency RoPE divisors, as llama.cpp's converter computes <c>rope_freqs.weight</c>.</summary>
    private static Tensor RopeFactors(LlamaConfig c)
    {
        var s = c.RopeScaling!;
        var factors = new float[c.HeadDim / 2];
        double lowWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor, highWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
        for (int i = 0; i < factors.Length; i++)
        {
            double freq = 1.0 / Math.Pow(c.RopeTheta, 2.0 * i / c.HeadDim);
            double wavelen = 2 * Math.PI / freq;
            if (wavelen < highWavelen) factors[i] = 1;
            else if (wavelen > lowWavelen) factors[i] = (float)s.Factor;
            else
            {
                double smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
                factors[i] = (float)(1 / ((1 - smooth) / s.Factor + smooth));
            }
        }
        return tensor(factors);
    }

    // Converts row blocks of at most ~16 MB of float32 at a time, so no second full-size buffer exists.
    private static unsafe void WriteRows(GgufWriter writer, Planned t, Tensor w)
    {
        long columns = t.Shape[^1];
        long rows = w.numel() / columns;
        long rowsPerChunk = Math.Max(1, (4L << 20) / columns);
        long rowBytes = t.Type.RowBytes(columns);
        var buffer = new byte[checked((int)(Math.Min(rows, rowsPerChunk) * rowBytes))];
        var all = new ReadOnlySpan<float>((void*)TensorMemory.DataPointer(w), checked((int)w.numel()));
        for (long r = 0; r < rows; r += rowsPerChunk)
        {
            long n = Math.Min(rowsPerChunk, rows - r);
            var dst = buffer.AsSpan(0, (int)(n * rowBytes));
            GgmlQuantizer.Quantize(t.Type, all.Slice((int)(r * columns), (int)(n * columns)), columns, dst);
            writer.Append(t.GgufName, dst);
        }
    }
}
