using System.Text.Json;
using System.Text.Json.Nodes;

namespace QLora.Quant;

/// <summary>
/// Turns a safetensors file or a Hugging Face model folder into a bitsandbytes 4-bit checkpoint, streaming tensor by
/// tensor from the memory-mapped input: peak memory is about the largest tensor plus its output, whatever the file size.
/// </summary>
public static class CheckpointQuantizer
{
    /// <summary>What a run did.</summary>
    public sealed record Report(int QuantizedTensors, int CopiedTensors, long QuantizedElements, long InputBytes, long OutputBytes);

    private static readonly string[] WeightFileNames = ["model.safetensors.index.json", "model.safetensors"];

    /// <summary>Quantizes one safetensors file into another (written atomically).</summary>
    public static Report QuantizeFile(string input, string output, QuantizeOptions options, Action<string>? log = null)
    {
        var include = options.IncludeRegex();
        QuantTypes.ValidateBlocksize(options.Blocksize);
        PathOverlap.Refuse("output", output, ("input", input));
        using var reader = SafetensorsReader.Open(input);
        NonFiniteValues.Check(input, reader.Tensors, n => reader.GetSpan(n), options.NonFinite, log, "pass --non-finite warn");

        // Pass 1: lay out the output. A quantized weight's entries depend only on its shape and, through the
        // quant-state JSON, on the double-quantization offset, which the cheap absmax pass gives.
        var plans = new List<(TensorInfo Info, QuantState? State)>();
        var metadata = new Dictionary<string, string>(reader.Metadata) { ["format"] = "pt" };
        using var writer = new SafetensorsWriter(output, metadata);
        foreach (var t in reader.Tensors)
        {
            if (options.Quantizes(t, include) && FloatTypes.FromTensorDType(t.DType) is { } ft)
            {
                var absmax = FourBitQuantizer.ComputeAbsmax(reader.GetSpan(t.Name), ft, options.Blocksize);
                var state = new QuantState
                {
                    QuantType = options.QuantType, Blocksize = options.Blocksize, DType = ft, Shape = t.Shape,
                    Absmax = options.DoubleQuant ? null : absmax,
                    Nested = options.DoubleQuant
                        ? new NestedAbsmax { Codes = [], Absmax = [], Map = [], Offset = DoubleQuantizer.Offset(absmax) }
                        : null,
                };
                foreach (var slot in BnbCheckpointLayout.Describe(t.Name, state, out _)) writer.Declare(slot.Name, slot.DType, slot.Shape);
                plans.Add((t, state));
            }
            else
            {
                writer.Declare(t.Name, t.DType, t.Shape);
                plans.Add((t, null));
            }
        }

        // Pass 2: quantize and write one tensor at a time.
        int quantized = 0, copied = 0;
        long elements = 0;
        foreach (var (info, planned) in plans)
        {
            if (planned is null)
            {
                writer.Write(info.Name, reader.GetSpan(info.Name));
                copied++;
                continue;
            }
            var q = FourBitQuantizer.Quantize(reader.GetSpan(info.Name), planned.DType, info.Shape, options.QuantType, options.Blocksize, options.DoubleQuant);
            if (q.State.Nested is { } n && BitConverter.SingleToInt32Bits(n.Offset) != BitConverter.SingleToInt32Bits(planned.Nested!.Offset))
                throw new InvalidOperationException($"{info.Name}: double-quantization offset changed between passes");
            foreach (var e in BnbCheckpointLayout.ToEntries(info.Name, q)) writer.Write(e.Name, e.Data);
            quantized++;
            elements += info.ElementCount;
            log?.Invoke($"quantized {info.Name} [{string.Join(", ", info.Shape)}] {info.DType} -> {q.StorageBytes:N0} bytes");
        }
        writer.Commit();
        return new Report(quantized, copied, elements, new FileInfo(input).Length, new FileInfo(output).Length);
    }

    /// <summary>
    /// Quantizes a Hugging Face model folder (config.json, model.safetensors or shards with an index, tokenizer files)
    /// into a new folder with the same shard layout, config.json carrying <c>quantization_config</c>, other files copied.
    /// The output folder is written beside its final name and renamed into place when complete; an existing output
    /// folder is replaced only with <paramref name="overwrite"/>, and only after the new one is complete.
    /// </summary>
    public static Report QuantizeFolder(string inputDir, string outputDir, QuantizeOptions options, Action<string>? log = null, bool overwrite = false)
    {
        PathOverlap.Refuse("output", outputDir, ("input", inputDir));
        var configPath = Path.Combine(inputDir, "config.json");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{inputDir}: not a Hugging Face model folder (no config.json)", configPath);
        JsonObject config;
        try { config = JsonNode.Parse(File.ReadAllText(configPath))?.AsObject() ?? throw new FormatException("empty"); }
        catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException)
        {
            throw new FormatException($"{configPath}: not a JSON object ({e.Message})");
        }
        if (config["quantization_config"] is not null)
            throw new InvalidOperationException($"{configPath}: the model is already quantized (it has quantization_config)");
        var shards = ListShards(inputDir);
        var skipModules = DenseLinearModules(inputDir, options);
        using var output = StagedFolder.Create(outputDir, overwrite);
        var staging = output.Path;
        var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
        int q = 0, c = 0;
        long elements = 0, inBytes = 0, outBytes = 0, tensorBytes = 0;
        foreach (var shard in shards)
        {
            var target = Path.Combine(staging, shard);
            var r = QuantizeFile(Path.Combine(inputDir, shard), target, options, log);
            q += r.QuantizedTensors; c += r.CopiedTensors; elements += r.QuantizedElements;
            inBytes += r.InputBytes; outBytes += r.OutputBytes;
            using var written = SafetensorsReader.Open(target);
            foreach (var t in written.Tensors) { weightMap[t.Name] = shard; tensorBytes += t.ByteLength; }
            log?.Invoke($"wrote {shard}: {r.QuantizedTensors} quantized, {r.CopiedTensors} copied, {r.OutputBytes:N0} bytes");
        }
        if (File.Exists(Path.Combine(inputDir, "model.safetensors.index.json")))
        {
            var index = new JsonObject
            {
                ["metadata"] = new JsonObject { ["total_size"] = tensorBytes },
                ["weight_map"] = new JsonObject(weightMap.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
            };
            WriteJson(Path.Combine(staging, "model.safetensors.index.json"), index);
        }
        var cfg = new BnbQuantizationConfig
        {
            QuantType = options.QuantType, DoubleQuant = options.DoubleQuant, SkipModules = skipModules,
            ComputeDType = config["torch_dtype"]?.GetValue<string>() is { } td && TryParseFloat(td, out var ct) ? ct : FloatType.BFloat16,
        };
        config["quantization_config"] = cfg.ToJson();
        WriteJson(Path.Combine(staging, "config.json"), config);
        CopySideFiles(inputDir, staging);
        output.Commit();
        return new Report(q, c, elements, inBytes, outBytes);
    }

    /// <summary>
    /// The llm_int8_skip_modules a folder quantized with <paramref name="options"/> needs so that transformers loads it:
    /// null when only lm_head stays dense (transformers' default keeps exactly that one), else every Linear module left
    /// dense, lm_head included unless it is quantized (a list replaces the default rather than extending it). Throws
    /// <see cref="ArgumentException"/> when the include pattern reaches the embedding, which transformers never quantizes.
    /// </summary>
    private static List<string>? DenseLinearModules(string inputDir, QuantizeOptions options)
    {
        var include = options.IncludeRegex();
        using var checkpoint = SafetensorsCheckpoint.Open(inputDir);
        var dense = new SortedSet<string>(StringComparer.Ordinal);
        bool headQuantized = false;
        foreach (var t in checkpoint.Tensors)
        {
            if (FloatTypes.FromTensorDType(t.DType) is null || t.Shape.Length != 2 || !t.Name.EndsWith(".weight", StringComparison.Ordinal)) continue;
            bool quantized = options.Quantizes(t, include);
            if (t.Name.EndsWith("embed_tokens.weight", StringComparison.Ordinal))
            {
                if (quantized) throw new ArgumentException($"--include '{options.Include}' matches {t.Name}: transformers quantizes Linear layers only and could not load an embedding stored 4-bit");
                continue;
            }
            if (t.Name == "lm_head.weight") headQuantized = quantized;
            if (!quantized) dense.Add(QuantizeOptions.ModuleOf(t.Name));
        }
        if (!headQuantized) dense.Add("lm_head"); // tied heads too: a Linear module transformers must not convert
        return dense.Count == 1 && dense.Contains("lm_head") ? null : dense.ToList();
    }

    /// <summary>
    /// Copies the files of a model folder that are neither weights nor config.json (tokenizer files, generation config,
    /// chat templates, ...) into another folder.
    /// </summary>
    public static void CopySideFiles(string fromDir, string toDir)
    {
        foreach (var file in Directory.EnumerateFiles(fromDir))
        {
            var name = Path.GetFileName(file);
            if (name == "config.json" || name.EndsWith(".safetensors", StringComparison.Ordinal) || name == "model.safetensors.index.json") continue;
            File.Copy(file, Path.Combine(toDir, name));
        }
    }

    /// <summary>Writes config-style JSON (indented) atomically.</summary>
    public static void WriteJson(string path, JsonNode node) =>
        AtomicFile.WriteAllBytes(path, System.Text.Encoding.UTF8.GetBytes(node.ToJsonString(new JsonSerializerOptions { WriteIndented = true, NewLine = "\n" }) + "\n"));

    /// <summary>The safetensors files of a model folder: the shards named by its index, or model.safetensors.</summary>
    public static IReadOnlyList<string> ListShards(string dir)
    {
        var indexPath = Path.Combine(dir, WeightFileNames[0]);
        if (File.Exists(indexPath))
        {
            using var checkpoint = SafetensorsCheckpoint.Open(dir);
            return checkpoint.Shards.Select(r => Path.GetFileName(r.Path)).Distinct().OrderBy(s => s, StringComparer.Ordinal).ToList();
        }
        if (File.Exists(Path.Combine(dir, WeightFileNames[1]))) return [WeightFileNames[1]];
        throw new FileNotFoundException($"{dir}: no model.safetensors or model.safetensors.index.json");
    }

    private static bool TryParseFloat(string name, out FloatType type)
    {
        try { type = FloatTypes.Parse(name); return true; }
        catch (FormatException) { type = default; return false; }
    }
}
