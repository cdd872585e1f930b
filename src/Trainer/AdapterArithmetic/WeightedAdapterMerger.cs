using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Several PEFT LoRA adapters of one base combined into one new adapter, as PEFT's
/// <c>LoraModel.add_weighted_adapter</c> does (<c>qlora merge-adapters</c>). Each input is read and checked in full
/// (<see cref="AdapterCheck"/>: against the base when one is given, else against the modules and shapes the adapters
/// themselves give). Where PEFT applies the weights:
/// <list type="bullet">
/// <item><c>linear</c>, <c>ties</c>, <c>dare_*</c>, <c>magnitude_prune</c> merge the A matrices with weights
/// <c>sign(w·s)·√|w·s|</c> and the B matrices with <c>√|w·s|</c> (s = the adapter's scaling for that module), each side
/// on its own, so the product has cross terms (PEFT's behaviour); every adapter needs the same rank.</item>
/// <item><c>cat</c> stacks <c>w·s·A</c> and B along the rank: the exact Σ w·s·B·A at the sum of the ranks.</item>
/// <item><c>svd</c> and <c>*_svd</c> merge the deltas <c>s·B·A</c> with weights w and factor the result to the new rank
/// (<see cref="SvdTruncation"/>). PEFT multiplies those deltas, which already carry s, by <c>w·s</c>, applying the
/// scaling twice; here it is applied once, so that a full-rank <c>svd</c> equals <c>cat</c> (the two agree when
/// lora_alpha = r).</item>
/// </list>
/// The result has PEFT's config: the first adapter's, with <c>r = lora_alpha</c> = the new rank (scaling 1, as the
/// scalings are inside the weights), no rank or alpha patterns, <c>use_rslora</c> false (PEFT's fix for an rsLoRA
/// input), and target modules that select exactly the merged modules (the union of the inputs' lists or regexes, or
/// the module names themselves when an input restricts its layers or excludes modules). Modules with a smaller rank
/// than the new one (a module only some adapters have, under <c>cat</c>) are padded with zeros, as PEFT does.
/// A single adapter is combined with <c>linear</c>, as PEFT does.
/// </summary>
public static class WeightedAdapterMerger
{

    /// <summary>What a merge wrote.</summary>
    public sealed record Report(AdapterCombination Combination, int Modules, int Rank, string DType, long OutputBytes);

    private sealed record Module(int Rank, long Out, long In);

    private sealed class Input(string folder, LoraOptions options, JsonObject config, SafetensorsReader reader, Dictionary<string, Module> modules) : IDisposable
    {
        public string Folder { get; } = folder;
        public LoraOptions Options { get; } = options;
        public JsonObject Config { get; } = config;
        public SafetensorsReader Reader { get; } = reader;
        public Dictionary<string, Module> Modules { get; } = modules;
        // PEFT's rank for the whole adapter: r, or the largest rank_pattern value when that is larger.
        public int MaxRank => Options.RankPattern.Select(p => p.Value).Append(Options.Rank).Max();
        public void Dispose() => Reader.Dispose();
    }

    /// <summary>
    /// Combines the adapters in <paramref name="adapterFolders"/> by <paramref name="options"/> into a new PEFT adapter
    /// folder <paramref name="outputFolder"/> (written under a temporary name and moved into place when complete; an
    /// existing non-empty folder is replaced only with <paramref name="overwrite"/>, an input never). With
    /// <paramref name="baseFolder"/>, the inputs and the result are checked against the base model's projections.
    /// </summary>
    public static Report Merge(IReadOnlyList<string> adapterFolders, AdapterMergeOptions options, string outputFolder,
        string? baseFolder = null, bool overwrite = false, Action<string>? log = null)
    {
        options.Validate(adapterFolders.Count);
        var named = adapterFolders.Select(f => ("adapter", f)).ToList();
        if (baseFolder is not null) named.Add(("base", baseFolder));
        PathOverlap.Refuse("output", outputFolder, [.. named]);

        var inputs = new List<Input>();
        try
        {
            foreach (var folder in adapterFolders) inputs.Add(Read(folder));
            var projections = baseFolder is null ? ModulesOf(inputs) : BaseProjections(baseFolder);
            foreach (var input in inputs) AdapterCheck.Verify(input.Reader.Path, input.Options, projections);

            var combination = options.Combination;
            if (inputs.Count == 1 && combination != AdapterCombination.Linear)
            {
                log?.Invoke($"one adapter: combined with linear (its weight times its scaling), as PEFT's add_weighted_adapter does whatever the combination asked for");
                combination = AdapterCombination.Linear;
            }
            int rank = NewRank(inputs, combination, options.SvdRank);
            var modules = inputs.SelectMany(i => i.Modules.Keys).Distinct().Order(StringComparer.Ordinal).ToList();
            // The first adapter's dtype, as PEFT keeps it.
            var dtype = TorchDTypes.ToScalarType(inputs[0].Reader.GetInfo(PeftAdapter.LoraAKey(inputs[0].Modules.Keys.Order(StringComparer.Ordinal).First())));

            using var output = StagedFolder.Create(outputFolder, overwrite);
            var weightsPath = Path.Combine(output.Path, PeftAdapter.WeightsFile);
            long bytes;
            using (var writer = new SafetensorsWriter(weightsPath, new Dictionary<string, string> { ["format"] = "pt" }))
            {
                foreach (var m in modules)
                {
                    var shape = projections[m];
                    writer.Declare(PeftAdapter.LoraAKey(m), TorchDTypes.ToTensorDType(dtype), [rank, shape[1]]);
                    writer.Declare(PeftAdapter.LoraBKey(m), TorchDTypes.ToTensorDType(dtype), [shape[0], rank]);
                }
                foreach (var m in modules)
                {
                    using var scope = NewDisposeScope();
                    var (a, b) = Combine(inputs, options, combination, m, rank, projections[m]);
                    writer.Write(PeftAdapter.LoraAKey(m), a.to(dtype).contiguous().bytes);
                    writer.Write(PeftAdapter.LoraBKey(m), b.to(dtype).contiguous().bytes);
                }
                writer.Commit();
                bytes = writer.DataBytes;
            }
            WriteConfig(OutputConfig(inputs, rank, modules), output.Path);

            // The result, read back as any adapter is: every merged module selected, complete, finite.
            var written = PeftAdapter.ReadOptions(output.Path);
            foreach (var m in modules)
                if (!written.IsTarget(m)) throw new InvalidOperationException($"the merged adapter_config.json does not select {m}; this is a bug");
            AdapterCheck.Verify(weightsPath, written, projections);
            output.Commit();
            log?.Invoke($"{combination.Name()} of {inputs.Count} adapter{(inputs.Count == 1 ? "" : "s")} ({string.Join(", ", options.Weights.Select(w => w.ToString("R", System.Globalization.CultureInfo.InvariantCulture)))}): {modules.Count} modules, r = lora_alpha = {rank}");
            return new Report(combination, modules.Count, rank, TorchDTypes.ToFloatType(dtype).Name(), bytes);
        }
        finally
        {
            foreach (var input in inputs) input.Dispose();
        }
    }

    private static Input Read(string folder)
    {
        var options = PeftAdapter.ReadOptions(folder);
        // PEFT's add_weighted_adapter combines lora_A/lora_B only; a DoRA adapter's magnitudes belong to its own B·A.
        if (options.UseDora)
            throw new InvalidDataException($"{folder} is a DoRA adapter (use_dora true): its magnitude vectors cannot be combined with other adapters' weights; merge it into its base with qlora merge instead");
        var weightsPath = Path.Combine(folder, PeftAdapter.WeightsFile);
        if (!File.Exists(weightsPath)) throw new FileNotFoundException($"{folder}: no {PeftAdapter.WeightsFile}", weightsPath);
        var config = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(folder, PeftAdapter.ConfigFile)))!;
        var reader = SafetensorsReader.Open(weightsPath);
        var modules = new Dictionary<string, Module>(StringComparer.Ordinal);
        foreach (var t in reader.Tensors)
        {
            if (PeftAdapter.ModuleOfLoraA(t.Name) is not { } module) continue;
            var bKey = PeftAdapter.LoraBKey(module);
            long outDim = reader.Contains(bKey) && reader.GetInfo(bKey).Shape.Length == 2 ? reader.GetInfo(bKey).Shape[0] : -1;
            if (t.Shape.Length == 2) modules[module] = new Module((int)t.Shape[0], outDim, t.Shape[1]);
        }
        if (modules.Count == 0)
        {
            reader.Dispose();
            throw new InvalidDataException($"{weightsPath}: no lora_A/lora_B tensors, so nothing to merge");
        }
        return new Input(folder, options, config, reader, modules);
    }

    // Without a base: the modules the adapters adapt, with the [out, in] their A and B give; adapters that disagree are refused.
    private static Dictionary<string, long[]> ModulesOf(List<Input> inputs)
    {
        var shapes = new Dictionary<string, (long[] Shape, string Folder)>(StringComparer.Ordinal);
        foreach (var input in inputs)
        {
            foreach (var (name, m) in input.Modules)
            {
                long[] shape = [m.Out, m.In];
                if (shapes.TryGetValue(name, out var seen) && !seen.Shape.SequenceEqual(shape) && m.Out >= 0 && seen.Shape[0] >= 0)
                    throw new InvalidDataException($"{input.Folder} adapts {name} as a [{m.Out}, {m.In}] weight, {seen.Folder} as [{string.Join(", ", seen.Shape)}]: adapters of different base models cannot be merged");
                if (!shapes.ContainsKey(name) || seen.Shape[0] < 0) shapes[name] = (shape, input.Folder);
            }
        }
        return shapes.ToDictionary(s => s.Key, s => s.Value.Shape, StringComparer.Ordinal);
    }

    private static Dictionary<string, long[]> BaseProjections(string baseFolder)
    {
        using var checkpoint = SafetensorsCheckpoint.Open(baseFolder);
        return AdapterCheck.Projections(checkpoint);
    }

    // PEFT's new rank: the common rank (element-wise kinds), the sum of the ranks (cat), or --svd-rank / the largest.
    private static int NewRank(List<Input> inputs, AdapterCombination combination, int? svdRank)
    {
        var ranks = inputs.Select(i => i.MaxRank).ToList();
        if (combination.NeedsEqualRanks())
        {
            if (ranks.Distinct().Count() > 1)
                throw new ArgumentException($"--combination {combination.Name()} adds the A matrices together and the B matrices together, so every adapter needs the same rank; got r = {string.Join(", ", ranks)} ({string.Join(", ", inputs.Select(i => i.Folder))}); use cat or svd to merge adapters of different ranks");
            return ranks[0];
        }
        return combination == AdapterCombination.Cat ? ranks.Sum() : svdRank ?? ranks.Max();
    }

    private static Tensor ReadF64(Input input, string module, string part)
    {
        var key = PeftAdapter.Key(module, part);
        using var stored = TorchDTypes.FromBytes(input.Reader.GetSpan(key), input.Reader.GetInfo(key));
        return stored.to(ScalarType.Float64);
    }

    // One module's A [rank, in] and B [out, rank] in float64.
    private static (Tensor A, Tensor B) Combine(List<Input> inputs, AdapterMergeOptions options, AdapterCombination combination, string module, int rank, long[] shape)
    {
        var present = inputs.Select((input, index) => (Input: input, Index: index, Weight: options.Weights[index]))
            .Where(p => p.Input.Modules.ContainsKey(module)).ToList();
        var scalings = present.Select(p => p.Input.Options.ForModule(module).Scaling).ToList();
        if (combination == AdapterCombination.Cat)
        {
            var a = cat(present.Select((p, i) => ReadF64(p.Input, module, "lora_A") * (p.Weight * scalings[i])).ToList(), 0);
            var b = cat(present.Select(p => ReadF64(p.Input, module, "lora_B")).ToList(), 1);
            return (Pad(a, rank, 0), Pad(b, rank, 1));
        }
        if (combination == AdapterCombination.Svd)
        {
            var p = cat(present.Select((x, i) => ReadF64(x.Input, module, "lora_B") * (x.Weight * scalings[i])).ToList(), 1);
            var q = cat(present.Select(x => ReadF64(x.Input, module, "lora_A")).ToList(), 0);
            return SvdTruncation.FactorProduct(p, q, rank, options.SvdClamp);
        }
        var method = combination.Method()!.Value;
        double density = options.Density ?? 1;
        var sign = options.MajoritySign ?? MajoritySignMethod.Total;
        List<SplitMix64> Streams(string part) => present.Select(p => SplitMix64.ForKey(options.Seed, $"{module}.{part}#{p.Index}")).ToList();
        if (combination.IsSvd())
        {
            var deltas = present.Select((p, i) => Flat(ReadF64(p.Input, module, "lora_B").matmul(ReadF64(p.Input, module, "lora_A")) * scalings[i])).ToList();
            var merged = TaskTensorMerge.Merge(method, deltas, present.Select(p => p.Weight).ToList(), density, sign, Streams("delta"));
            return SvdTruncation.Factor(tensor(merged, [shape[0], shape[1]]), rank, options.SvdClamp);
        }
        var ranks = present.Select(p => p.Input.Modules[module].Rank).Distinct().ToList();
        if (ranks.Count > 1)
            throw new ArgumentException($"{module} has rank {string.Join(" in one adapter, ", ranks)} in another (rank_pattern): --combination {combination.Name()} adds A to A and B to B and needs one rank per module; use cat or svd");
        // PEFT: √|w·s| on each side, the sign on A only.
        var wb = present.Select((p, i) => Math.Sqrt(Math.Abs(p.Weight * scalings[i]))).ToList();
        var wa = present.Select((p, i) => p.Weight * scalings[i] >= 0 ? wb[i] : -wb[i]).ToList();
        int r = ranks[0];
        var mergedA = TaskTensorMerge.Merge(method, present.Select(p => Flat(ReadF64(p.Input, module, "lora_A"))).ToList(), wa, density, sign, Streams("lora_A"));
        var mergedB = TaskTensorMerge.Merge(method, present.Select(p => Flat(ReadF64(p.Input, module, "lora_B"))).ToList(), wb, density, sign, Streams("lora_B"));
        return (Pad(tensor(mergedA, [r, shape[1]]), rank, 0), Pad(tensor(mergedB, [shape[0], r]), rank, 1));
    }

    private static double[] Flat(Tensor t) => t.contiguous().data<double>().ToArray();

    // Zeros appended along the rank dimension up to rank (PEFT allocates the new adapter at its full rank).
    private static Tensor Pad(Tensor t, int rank, int dim)
    {
        long have = t.shape[dim];
        if (have == rank) return t;
        var shape = (long[])t.shape.Clone();
        shape[dim] = rank - have;
        return cat([t, zeros(shape, dtype: t.dtype)], dim);
    }

    private static JsonObject OutputConfig(List<Input> inputs, int rank, List<string> modules)
    {
        var config = (JsonObject)inputs[0].Config.DeepClone();
        bool restricted = inputs.Any(i => i.Options.ExcludeModules is not null || i.Options.ExcludeRegex is not null
            || i.Options.LayersToTransform is not null || i.Options.LayersPattern is not null);
        JsonNode targets;
        if (!restricted && inputs.All(i => i.Options.TargetRegex is null))
            targets = new JsonArray(inputs.SelectMany(i => i.Options.TargetModules).Distinct().Order(StringComparer.Ordinal).Select(t => (JsonNode?)t).ToArray());
        else if (!restricted && inputs.All(i => i.Options.TargetRegex is not null))
            targets = JsonValue.Create(string.Join("|", inputs.Select(i => $"({i.Options.TargetRegex})")))!;
        else
        {
            // PEFT would copy the first adapter's layer and exclude settings onto the union, which can select modules no
            // adapter has or drop ones that one has; the module names themselves select exactly the merged modules.
            targets = new JsonArray(modules.Select(m => (JsonNode?)m).ToArray());
            config["exclude_modules"] = null;
            config["layers_to_transform"] = null;
            config["layers_pattern"] = null;
        }
        config["peft_type"] = "LORA";
        config["r"] = rank;
        config["lora_alpha"] = rank;
        config["target_modules"] = targets;
        config["rank_pattern"] = new JsonObject();
        config["alpha_pattern"] = new JsonObject();
        config["use_rslora"] = false;
        return config;
    }

    // PEFT's layout: keys sorted, indent 2; written atomically.
    private static void WriteConfig(JsonObject config, string folder)
    {
        var sorted = new JsonObject(config.OrderBy(kv => kv.Key, StringComparer.Ordinal)
            .Select(kv => KeyValuePair.Create(kv.Key, kv.Value?.DeepClone())));
        var json = sorted.ToJsonString(new JsonSerializerOptions { WriteIndented = true, NewLine = "\n" });
        AtomicFile.WriteAllBytes(Path.Combine(folder, PeftAdapter.ConfigFile), Encoding.UTF8.GetBytes(json));
    }
}
