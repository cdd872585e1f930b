using QLora.Quant;

namespace QLora.Trainer;

/// <summary>
/// A PEFT adapter checked in full before it is used: every tensor is a lora_A/lora_B (and, with use_dora, a
/// lora_magnitude_vector) of a module the base has and adapter_config.json selects, every selected module has them all,
/// their shapes agree with the config's rank and the base weight (a rank-16 tensor under <c>r: 8</c> would merge at the
/// wrong scaling), and every value is finite. Each problem is an <see cref="InvalidDataException"/> naming the tensor.
/// </summary>
public static class AdapterCheck
{

    /// <summary>
    /// Checks the adapter weights <paramref name="weightsPath"/> against <paramref name="options"/> (its config) and the
    /// base model's projections <paramref name="baseProjections"/> (module name → weight shape [out, in]).
    /// </summary>
    public static void Verify(string weightsPath, LoraOptions options, IReadOnlyDictionary<string, long[]> baseProjections)
    {
        using var reader = SafetensorsReader.Open(weightsPath);
        var names = reader.Tensors.Select(t => t.Name).ToHashSet(StringComparer.Ordinal);
        foreach (var key in names.Order(StringComparer.Ordinal))
        {
            var module = ModuleOf(weightsPath, key, options.UseDora);
            if (!baseProjections.ContainsKey(module)) throw new InvalidDataException($"{weightsPath}: {key} targets {module}, which the base model does not have");
            if (!options.IsTarget(module)) throw new InvalidDataException($"{weightsPath}: {key} targets {module}, which adapter_config.json does not select");
        }
        foreach (var (module, shape) in baseProjections.OrderBy(p => p.Key, StringComparer.Ordinal))
        {
            if (!options.IsTarget(module)) continue;
            int r = options.RankFor(module); // r, or its rank_pattern entry
            var parts = new List<(string Key, long[] Expected)> { (PeftAdapter.LoraAKey(module), [r, shape[1]]), (PeftAdapter.LoraBKey(module), [shape[0], r]) };
            if (options.UseDora) parts.Add((PeftAdapter.MagnitudeKey(module), [shape[0]]));
            foreach (var (key, expected) in parts)
            {
                if (!names.Contains(key))
                    throw new InvalidDataException($"{weightsPath}: no {key}: adapter_config.json selects {module}, but the adapter has no weights for it (incomplete adapter)");
                var info = reader.GetInfo(key);
                if (!info.Shape.SequenceEqual(expected))
                    throw new InvalidDataException(key.EndsWith(PeftAdapter.MagnitudeSuffix, StringComparison.Ordinal)
                        ? $"{weightsPath}: {key} has shape [{string.Join(", ", info.Shape)}]; the base weight [{string.Join(", ", shape)}] needs a magnitude of [{shape[0]}] (one per output row)"
                        : $"{weightsPath}: {key} has shape [{string.Join(", ", info.Shape)}]; adapter_config.json gives {module} r = {r} (r or rank_pattern), which with the base weight [{string.Join(", ", shape)}] needs [{string.Join(", ", expected)}]");
                RequireFinite(reader, key);
            }
        }
    }

    /// <summary>
    /// The modules of a base checkpoint an adapter may target: every 2-D <c>model.layers.*.weight</c> (a 4-bit weight by
    /// its unpacked shape), module name → [out, in], as <see cref="Verify"/> takes them.
    /// </summary>
    public static Dictionary<string, long[]> Projections(SafetensorsCheckpoint checkpoint)
    {
        var weights = new SafetensorsModelWeights(checkpoint);
        return checkpoint.Tensors.Select(t => t.Name)
            .Where(n => !BnbCheckpointLayout.IsAuxiliaryKey(n) && n.StartsWith("model.layers.", StringComparison.Ordinal) && n.EndsWith(".weight", StringComparison.Ordinal))
            .Select(n => (Module: n[..^".weight".Length], Shape: weights.Shape(n))).Where(p => p.Shape.Length == 2)
            .ToDictionary(p => p.Module, p => p.Shape, StringComparer.Ordinal);
    }

    /// <summary>
    /// The module a key of adapter_model.safetensors belongs to (<c>base_model.model.&lt;module&gt;.lora_A.weight</c>,
    /// <c>.lora_B.weight</c>, and with <paramref name="dora"/> <c>.lora_magnitude_vector</c>); any other key is refused.
    /// </summary>
    public static string ModuleOf(string weightsPath, string key, bool dora)
    {
        if (key.StartsWith(PeftAdapter.KeyPrefix, StringComparison.Ordinal))
        {
            foreach (var suffix in new[] { ".lora_A.weight", ".lora_B.weight" })
                if (key.EndsWith(suffix, StringComparison.Ordinal)) return key[PeftAdapter.KeyPrefix.Length..^suffix.Length];
            if (key.EndsWith(PeftAdapter.MagnitudeSuffix, StringComparison.Ordinal))
                return dora ? key[PeftAdapter.KeyPrefix.Length..^PeftAdapter.MagnitudeSuffix.Length]
                    : throw new InvalidDataException($"{weightsPath}: {key} is a DoRA magnitude vector, but adapter_config.json has use_dora false");
        }
        throw new InvalidDataException($"{weightsPath}: unexpected tensor {key} (expected base_model.model.<module>.lora_A/B.weight{(dora ? " or .lora_magnitude_vector" : "")})");
    }

    /// <summary>Refuses a tensor of <paramref name="reader"/> that holds NaN or infinity, naming it and the count.</summary>
    public static void RequireFinite(SafetensorsReader reader, string key)
    {
        var info = reader.GetInfo(key);
        if (FloatTypes.FromTensorDType(info.DType) is not { } ft) throw new InvalidDataException($"{reader.Path}: {key} is {info.DType}, not a float tensor");
        long n = NonFiniteValues.Count(reader.GetSpan(key), ft);
        if (n > 0) throw new InvalidDataException($"{reader.Path}: {key} has {n:N0} non-finite values (NaN or infinity) among {info.ElementCount:N0}; the adapter is damaged (a diverged run?) and would make every output NaN");
    }
}
