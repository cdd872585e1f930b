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
/// <c>.lora_B.weight</c> [out, r] (and, for DoRA, <c>.lora_magnitude_vector</c> [out]: PEFT saves the magnitude without
/// the adapter name and without ".weight"), so adapters move between this project and PEFT, vLLM or llama.cpp's converter.
/// </summary>
public static class PeftAdapter
{
    /// <summary>The config file name.</summary>
    public const string ConfigFile = "adapter_config.json";
    /// <summary>The weights file name.</summary>
    public const string WeightsFile = "adapter_model.safetensors";
    /// <summary>What every key of adapter_model.safetensors starts with, before the module's name.</summary>
    public const string KeyPrefix = "base_model.model.";
    /// <summary>The key suffix of a DoRA magnitude vector in adapter_model.safetensors (PEFT's saved form).</summary>
    public const string MagnitudeSuffix = ".lora_magnitude_vector";
    private const string LoraASuffix = ".lora_A.weight";

    /// <summary>The adapter_model.safetensors key of a module's LoRA matrix (<paramref name="part"/>: lora_A or lora_B).</summary>
    public static string Key(string module, string part) => $"{KeyPrefix}{module}.{part}.weight";

    /// <summary>The key of a module's lora_A matrix [r, in].</summary>
    public static string LoraAKey(string module) => Key(module, "lora_A");

    /// <summary>The key of a module's lora_B matrix [out, r].</summary>
    public static string LoraBKey(string module) => Key(module, "lora_B");

    /// <summary>The key of a module's DoRA magnitude vector [out].</summary>
    public static string MagnitudeKey(string module) => $"{KeyPrefix}{module}{MagnitudeSuffix}";

    /// <summary>The module whose lora_A matrix <paramref name="key"/> names, or null for any other key.</summary>
    public static string? ModuleOfLoraA(string key) =>
        key.StartsWith(KeyPrefix, StringComparison.Ordinal) && key.EndsWith(LoraASuffix, StringComparison.Ordinal) ? key[KeyPrefix.Length..^LoraASuffix.Length] : null;

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
                parts.Add((LoraAKey(name), layer.LoraA(adapter).detach().cpu().contiguous())); // a GPU model's adapters are copied to the host
                parts.Add((LoraBKey(name), layer.LoraB(adapter).detach().cpu().contiguous()));
                if (layer.Magnitude(adapter) is { } m) parts.Add((MagnitudeKey(name), m.detach().cpu().contiguous()));
            }
            if (parts.Count == 0) throw new ArgumentException($"no layer has an adapter named '{adapter}'");
            foreach (var (key, t) in parts) writer.Declare(key, TorchDTypes.ToTensorDType(t.dtype), t.shape);
            foreach (var (key, t) in parts) writer.Write(key, t.bytes);
            writer.Commit();
        }
        // target_modules: the entries that selected a module (a name or dotted suffix, as given).
        var adapted = model.LoraLayers.Where(l => l.Layer.Adapters.Contains(adapter)).Select(l => l.Name).ToList();
        bool dora = model.LoraLayers.Any(l => l.Layer.Adapters.Contains(adapter) && l.Layer.IsDora(adapter));
        var modules = options.TargetModules.Where(t => adapted.Any(n => n == t || n.EndsWith("." + t, StringComparison.Ordinal)))
            .Distinct().OrderBy(s => s, StringComparer.Ordinal).ToList();
        var config = new SortedDictionary<string, JsonNode?>(StringComparer.Ordinal)
        {
            ["alpha_pattern"] = new JsonObject(options.AlphaPattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)Alpha(kv.Value)))),
            ["base_model_name_or_path"] = baseModel,
            ["bias"] = "none",
            ["exclude_modules"] = options.ExcludeRegex is not null ? options.ExcludeRegex
                : options.ExcludeModules is null ? null : new JsonArray(options.ExcludeModules.Select(m => (JsonNode?)m).ToArray()),
            ["fan_in_fan_out"] = false,
            ["inference_mode"] = true,
            ["init_lora_weights"] = options.Init == "gaussian" ? "gaussian" : true,
            ["layers_pattern"] = options.LayersPattern is null ? null : new JsonArray(options.LayersPattern.Select(p => (JsonNode?)p).ToArray()),
            ["layers_to_transform"] = options.LayersToTransform is null ? null : new JsonArray(options.LayersToTransform.Select(i => (JsonNode?)i).ToArray()),
            ["lora_alpha"] = Alpha(options.Alpha),
            ["lora_dropout"] = Number(options.Dropout),
            ["modules_to_save"] = null,
            ["peft_type"] = "LORA",
            ["r"] = options.Rank,
            ["rank_pattern"] = new JsonObject(options.RankPattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
            ["target_modules"] = options.TargetRegex is not null ? options.TargetRegex : new JsonArray(modules.Select(m => (JsonNode?)m).ToArray()),
            ["task_type"] = "CAUSAL_LM",
            ["use_dora"] = dora,
            ["use_rslora"] = options.UseRsLora,
        };
        var json = new JsonObject(config).ToJsonString(new JsonSerializerOptions { WriteIndented = true, NewLine = "\n" });
        AtomicFile.WriteAllBytes(Path.Combine(folder, ConfigFile), Encoding.UTF8.GetBytes(json));
    }

    /// <summary>
    /// Reads adapter_config.json into LoRA options. Missing keys take PEFT's defaults (target_modules: q_proj and v_proj,
    /// PEFT's choice for Llama, Mistral and Qwen2). A field this project does not implement is refused by name when it
    /// is set to anything but its inactive default, so an adapter is never loaded with part of its meaning dropped.
    /// </summary>
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
            RefuseUnsupported(c);
            var target = c["target_modules"];
            string? targetRegex = target is JsonValue v && v.TryGetValue<string>(out var regex) && regex != "all-linear" ? regex : null;
            var options = new LoraOptions
            {
                AdapterName = adapterName,
                Rank = c["r"]?.GetValue<int>() ?? 8,
                Alpha = c["lora_alpha"]?.GetValue<double>() ?? 8,
                Dropout = c["lora_dropout"]?.GetValue<double>() ?? 0,
                UseRsLora = c["use_rslora"]?.GetValue<bool>() ?? false,
                UseDora = c["use_dora"]?.GetValue<bool>() ?? false,
                // "all-linear": every Linear but the output layer, i.e. the seven projections.
                TargetModules = target switch
                {
                    JsonArray a => a.Select(n => n!.GetValue<string>()).ToList(),
                    null => ["q_proj", "v_proj"],
                    _ => LoraOptions.AllLinear,
                },
                TargetRegex = targetRegex,
                ExcludeModules = c["exclude_modules"] is JsonArray ex ? ex.Select(n => n!.GetValue<string>()).ToList() : null,
                ExcludeRegex = c["exclude_modules"] is JsonValue exv ? exv.GetValue<string>() : null,
                RankPattern = Pattern(c, "rank_pattern", n => n.GetValue<int>()),
                AlphaPattern = Pattern(c, "alpha_pattern", n => n.GetValue<double>()),
                LayersToTransform = c["layers_to_transform"] switch
                {
                    JsonArray l => l.Select(n => n!.GetValue<int>()).ToList(),
                    JsonValue one when one.TryGetValue<int>(out var i) => [i],
                    _ => null,
                },
                LayersPattern = c["layers_pattern"] switch
                {
                    JsonArray l => l.Select(n => n!.GetValue<string>()).ToList(),
                    JsonValue one => [one.GetValue<string>()],
                    _ => null,
                },
            };
            if (targetRegex is not null && options.LayersToTransform is not null)
                throw new FormatException("layers_to_transform cannot be used when target_modules is a str (a regex); PEFT refuses this adapter too");
            if (targetRegex is not null && options.LayersPattern is not null)
                throw new FormatException("layers_pattern cannot be used when target_modules is a str (a regex); PEFT refuses this adapter too");
            try { options.Validate(); }
            catch (ArgumentException e) { throw new FormatException(e.Message, e); }
            return options;
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            throw new FormatException($"{path}: {e.Message}", e);
        }
    }

    // Fields that only describe the file or the run that wrote it, or that are inactive for the layers LoRA adapts here:
    // fan_in_fan_out (PEFT itself resets it for nn.Linear), qalora_group_size (only with use_qalora), megatron_core (only
    // with megatron_config), eva_config (initialisation only: the base stays untouched).
    private static readonly HashSet<string> Descriptive = new(StringComparer.Ordinal)
    {
        "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version", "runtime_config",
        "fan_in_fan_out", "qalora_group_size", "megatron_core", "eva_config",
    };

    // Fields this project reads and applies.
    private static readonly HashSet<string> Implemented = new(StringComparer.Ordinal)
    {
        "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules", "rank_pattern",
        "alpha_pattern", "layers_to_transform", "layers_pattern", "init_lora_weights", "bias", "use_dora", "modules_to_save",
    };

    // init_lora_weights values that leave the base weights as they are (the others train against a changed base, which
    // PEFT saves separately or converts away before saving with init_lora_weights = true).
    private static readonly string[] BaseKeepingInits = ["gaussian", "eva", "orthogonal", "mica"];

    private static void RefuseUnsupported(JsonObject c)
    {
        if (c["bias"] is JsonNode bias && bias.GetValue<string>() != "none")
            throw new FormatException($"bias '{bias.GetValue<string>()}' (trained base biases) is not supported; only \"none\"");
        if (!IsInactive(c["modules_to_save"]))
            throw new FormatException($"modules_to_save {c["modules_to_save"]!.ToJsonString()} (full trained copies of those modules) is not supported; only LoRA layers are loaded");
        if (c["init_lora_weights"] is JsonValue init && init.TryGetValue<string>(out var how) && !BaseKeepingInits.Contains(how))
            throw new FormatException($"init_lora_weights '{how}' changes the base weights the adapter was trained against and is not supported (convert the adapter with PEFT first)");
        foreach (var (key, value) in c)
        {
            if (Implemented.Contains(key) || Descriptive.Contains(key) || IsInactive(value)) continue;
            throw new FormatException($"{key} = {value!.ToJsonString()} is not supported (this project implements {string.Join(", ", Implemented.Order(StringComparer.Ordinal))})");
        }
    }

    // null, false, "", {} or []: how LoraConfig writes a feature that is off.
    private static bool IsInactive(JsonNode? value) => value switch
    {
        null => true,
        JsonObject o => o.Count == 0,
        JsonArray a => a.Count == 0,
        JsonValue v => v.TryGetValue<bool>(out var b) ? !b : v.TryGetValue<string>(out var s) && s.Length == 0,
        _ => false,
    };

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
            var parts = new List<(string Key, Tensor Target)>
            {
                (LoraAKey(name), layer.LoraA(adapterName)),
                (LoraBKey(name), layer.LoraB(adapterName)),
            };
            if (layer.Magnitude(adapterName) is { } magnitude) parts.Add((MagnitudeKey(name), magnitude));
            foreach (var (key, target) in parts)
            {
                if (!keys.Remove(key))
                    throw new InvalidDataException($"{weightsPath}: no {key} for target module {name}" +
                        (key.EndsWith(MagnitudeSuffix, StringComparison.Ordinal) ? " (the model's adapter is DoRA: use_dora / Lora:UseDora is true, the file's is not)" : ""));
                var info = reader.GetInfo(key);
                if (!info.Shape.SequenceEqual(target.shape))
                    throw new InvalidDataException($"{weightsPath}: {key} has shape [{string.Join(", ", info.Shape)}], the model needs [{string.Join(", ", target.shape)}]");
                AdapterCheck.RequireFinite(reader, key);
                plan.Add((key, target));
            }
        }
        if (keys.FirstOrDefault(k => k.EndsWith(MagnitudeSuffix, StringComparison.Ordinal)) is { } extra)
            throw new InvalidDataException($"{weightsPath}: {extra} is a DoRA magnitude vector, but the model's adapter is plain LoRA (use_dora / Lora:UseDora is false)");
        if (keys.Count > 0) throw new InvalidDataException($"{weightsPath}: {keys.First()} targets a module the model does not have");
        foreach (var (key, target) in plan)
        {
            using var source = TorchDTypes.FromBytes(reader.GetSpan(key), reader.GetInfo(key));
            using (no_grad()) target.copy_(source);
        }
    }

    // A {pattern: value} object in its file order (PEFT takes the first matching key).
    private static List<KeyValuePair<string, T>> Pattern<T>(JsonObject c, string name, Func<JsonNode, T> value) => c[name] switch
    {
        null => [],
        JsonObject o => o.Select(kv => KeyValuePair.Create(kv.Key, kv.Value is null ? throw new FormatException($"{name}['{kv.Key}'] is null") : value(kv.Value))).ToList(),
        var other => throw new FormatException($"{name} = {other.ToJsonString()} is not an object of module patterns"),
    };

    private static void ValidateKeys(string weightsPath, LoraOptions options)
    {
        using var reader = SafetensorsReader.Open(weightsPath);
        foreach (var key in reader.Tensors.Select(t => t.Name))
        {
            var module = AdapterCheck.ModuleOf(weightsPath, key, options.UseDora);
            if (!options.IsTarget(module)) throw new InvalidDataException($"{weightsPath}: {key} targets {module}, which adapter_config.json does not select");
        }
    }

    // PEFT's lora_alpha is an int unless it has a fraction.
    private static JsonNode Alpha(double v) => v == Math.Floor(v) && Math.Abs(v) < int.MaxValue ? JsonValue.Create((int)v) : Number(v);

    private static JsonNode Number(double v) => JsonNode.Parse(PythonFloat.Repr(v))!; // Python's spelling: 0.0, 0.05, 16.0
}
