using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// LoRA adapters in Hugging Face PEFT's format: <c>adapter_config.json</c> (indent 2, sorted keys) and
/// <c>adapter_model.safetensors</c> with keys <c>base_model.model.&lt;module&gt;.lora_A.weight</c> [r, in] and
/// <c>.lora_B.weight</c> [out, r], so adapters move between this project and PEFT, vLLM or llama.cpp's converter.
/// </summary>
public static class PeftAdapter
{
    /// <summary>The config file name.</summary>
    public const string ConfigFile = "adapter_config.json";
    /// <summary>The weights file name.</summary>
    public const string WeightsFile = "adapter_model.safetensors";
    private const string Prefix = "base_model.model.";

    /// <summary>Writes <paramref name="adapter"/> of <paramref name="model"/> into <paramref name="folder"/>; each file atomically.</summary>
    public static void Save(LlamaForCausalLM model, LoraOptions options, string folder, string adapter = "default", string? baseModel = null)
    {
        if (model.LoraLayers.Count == 0) throw new InvalidOperationException("the model has no LoRA adapters to save");
        Directory.CreateDirectory(folder);
        using (var writer = new SafetensorsWriter(Path.Combine(folder, WeightsFile), new Dictionary<string, string> { ["format"] = "pt" }))
        {
            var parts = new List<(string Key, Tensor Value)>();
            foreach (var (name, layer) in model.LoraLayers)
            {
                if (!layer.Adapters.Contains(adapter)) continue;
                parts.Add(($"{Prefix}{name}.lora_A.weight", layer.LoraA(adapter).detach().contiguous()));
                parts.Add(($"{Prefix}{name}.lora_B.weight", layer.LoraB(adapter).detach().contiguous()));
            }
            if (parts.Count == 0) throw new ArgumentException($"no layer has an adapter named '{adapter}'");
            foreach (var (key, t) in parts) writer.Declare(key, TorchDTypes.ToTensorDType(t.dtype), t.shape);
            foreach (var (key, t) in parts) writer.Write(key, t.bytes);
            writer.Commit();
        }
        var modules = model.LoraLayers.Where(l => l.Layer.Adapters.Contains(adapter))
            .Select(l => l.Name[(l.Name.LastIndexOf('.') + 1)..]).Distinct().OrderBy(s => s, StringComparer.Ordinal).ToList();
        var config = new SortedDictionary<string, JsonNode?>(StringComparer.Ordinal)
        {
            ["alpha_pattern"] = new JsonObject(),
            ["base_model_name_or_path"] = baseModel,
            ["bias"] = "none",
            ["fan_in_fan_out"] = false,
            ["inference_mode"] = true,
            ["init_lora_weights"] = options.Init == "gaussian" ? "gaussian" : true,
            ["layers_to_transform"] = options.LayersToTransform is null ? null : new JsonArray(options.LayersToTransform.Select(i => (JsonNode?)i).ToArray()),
            ["lora_alpha"] = options.Alpha == Math.Floor(options.Alpha) && Math.Abs(options.Alpha) < int.MaxValue ? (int)options.Alpha : Number(options.Alpha),
            ["lora_dropout"] = Number(options.Dropout),
            ["modules_to_save"] = null,
            ["peft_type"] = "LORA",
            ["r"] = options.Rank,
            ["rank_pattern"] = new JsonObject(),
            ["target_modules"] = options.TargetRegex is not null ? options.TargetRegex : new JsonArray(modules.Select(m => (JsonNode?)m).ToArray()),
            ["task_type"] = "CAUSAL_LM",
            ["use_dora"] = false,
            ["use_rslora"] = options.UseRsLora,
        };
        var json = new JsonObject(config).ToJsonString(new JsonSerializerOptions { WriteIndented = true, NewLine = "\n" });
        AtomicFile.WriteAllBytes(Path.Combine(folder, ConfigFile), Encoding.UTF8.GetBytes(json));
    }

    /// <summary>Reads adapter_config.json into LoRA options (missing keys take PEFT's defaults, unknown keys are ignored).</summary>
    public static LoraOptions ReadOptions(string folder, string adapterName = "default")
    {
        var path = Path.Combine(folder, ConfigFile);
        if (!File.Exists(path)) throw new FileNotFoundException($"{folder}: no {ConfigFile}, so not a PEFT adapter folder", path);
        JsonObject c;
        try { c = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new FormatException("not a JSON object"); }
        catch (JsonException e) { throw new FormatException($"{path}: not valid JSON ({e.Message})"); }
        try
        {
            string peftType = c["peft_type"]?.GetValue<string>() ?? "LORA";
            if (peftType != "LORA") throw new FormatException($"peft_type {peftType} is not supported (LORA only)");
            if (c["use_dora"]?.GetValue<bool>() == true) throw new FormatException("DoRA adapters (use_dora) are not supported");
            var target = c["target_modules"];
            return new LoraOptions
            {
                AdapterName = adapterName,
                Rank = c["r"]?.GetValue<int>() ?? 8,
                Alpha = c["lora_alpha"]?.GetValue<double>() ?? 8,
                Dropout = c["lora_dropout"]?.GetValue<double>() ?? 0,
                UseRsLora = c["use_rslora"]?.GetValue<bool>() ?? false,
                TargetModules = target is JsonArray a ? a.Select(n => n!.GetValue<string>()).ToList() : LoraOptions.AllLinear,
                TargetRegex = target is JsonValue v && v.TryGetValue<string>(out var regex) ? regex : null,
                LayersToTransform = c["layers_to_transform"] switch
                {
                    JsonArray l => l.Select(n => n!.GetValue<int>()).ToList(),
                    JsonValue one when one.TryGetValue<int>(out var i) => [i],
                    _ => null,
                },
            };
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            throw new FormatException($"{path}: {e.Message}", e);
        }
    }

    /// <summary>
    /// Attaches the adapter in <paramref name="folder"/> to <paramref name="model"/> and makes it active. Target modules
    /// or shapes that do not match the model are an <see cref="InvalidDataException"/> naming the tensor.
    /// </summary>
    public static LoraOptions Load(LlamaForCausalLM model, string folder, string adapterName = "default")
    {
        var options = ReadOptions(folder, adapterName);
        var weightsPath = Path.Combine(folder, WeightsFile);
        if (!File.Exists(weightsPath)) throw new FileNotFoundException($"{folder}: no {WeightsFile}", weightsPath);
        ValidateKeys(weightsPath, options);
        var names = model.ApplyLora(options);
        LoadWeights(model, folder, names, adapterName);
        model.SetAdapter(adapterName);
        return options;
    }

    /// <summary>
    /// Copies the weights in <paramref name="folder"/> into the existing adapter <paramref name="adapterName"/> of the
    /// layers <paramref name="names"/> (e.g. to resume training); every target, shape and key is checked before any
    /// weight changes, and a mismatch is an <see cref="InvalidDataException"/> naming the tensor.
    /// </summary>
    public static void LoadWeights(LlamaForCausalLM model, string folder, IReadOnlyList<string> names, string adapterName = "default")
    {
        var weightsPath = Path.Combine(folder, WeightsFile);
        if (!File.Exists(weightsPath)) throw new FileNotFoundException($"{folder}: no {WeightsFile}", weightsPath);
        using var reader = SafetensorsReader.Open(weightsPath);
        var keys = reader.Tensors.Select(t => t.Name).ToHashSet(StringComparer.Ordinal);
        var plan = new List<(string Key, Tensor Target)>();
        foreach (var name in names)
        {
            var layer = model.LoraLayers.Single(l => l.Name == name).Layer;
            foreach (var part in new[] { "lora_A", "lora_B" })
            {
                var key = $"{Prefix}{name}.{part}.weight";
                if (!keys.Remove(key)) throw new InvalidDataException($"{weightsPath}: no {key} for target module {name}");
                var target = part == "lora_A" ? layer.LoraA(adapterName) : layer.LoraB(adapterName);
                var info = reader.GetInfo(key);
                if (!info.Shape.SequenceEqual(target.shape))
                    throw new InvalidDataException($"{weightsPath}: {key} has shape [{string.Join(", ", info.Shape)}], the model needs [{string.Join(", ", target.shape)}]");
                AdapterCheck.RequireFinite(reader, key);
                plan.Add((key, target));
            }
        }
        if (keys.Count > 0) throw new InvalidDataException($"{weightsPath}: {keys.First()} targets a module the model does not have");
        foreach (var (key, target) in plan)
        {
            using var source = TorchDTypes.FromBytes(reader.GetSpan(key), reader.GetInfo(key));
            using (no_grad()) target.copy_(source);
        }
    }

    private static void ValidateKeys(string weightsPath, LoraOptions options)
    {
        using var reader = SafetensorsReader.Open(weightsPath);
        foreach (var key in reader.Tensors.Select(t => t.Name))
        {
            if (!key.StartsWith(Prefix, StringComparison.Ordinal) || !(key.EndsWith(".lora_A.weight", StringComparison.Ordinal) || key.EndsWith(".lora_B.weight", StringComparison.Ordinal)))
                throw new InvalidDataException($"{weightsPath}: unexpected tensor {key} (expected base_model.model.<module>.lora_A/B.weight)");
            var module = key[Prefix.Length..key.LastIndexOf(".lora_", StringComparison.Ordinal)];
            if (!options.IsTarget(module)) throw new InvalidDataException($"{weightsPath}: {key} targets {module}, which adapter_config.json does not select");
        }
    }

    private static JsonNode Number(double v) => JsonNode.Parse(PythonFloat.Repr(v))!; // Python's spelling: 0.0, 0.05, 16.0
}
