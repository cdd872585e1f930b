using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// PEFT adapter_config.json features beyond the defaults (rank_pattern, alpha_pattern, dotted target names,
/// exclude_modules, unsupported fields), on adapters written by the test in PEFT's layout. The expected weights are the
/// base plus (alpha/r)·B·A with each module's alpha and r chosen by hand from PEFT's matching rules, in float64.
/// </summary>
public class PeftConfigFeatureTests
{
    private const string Prefix = "base_model.model.";

    /// <summary>Writes an adapter: adapter_config.json from <paramref name="config"/> and random A/B of the given ranks.</summary>
    private static Dictionary<string, (Tensor A, Tensor B)> WriteAdapter(string dir, LlamaConfig c, JsonObject config, IReadOnlyDictionary<string, int> ranks, int seed)
    {
        Directory.CreateDirectory(dir);
        var gen = new Generator((ulong)seed);
        var result = new Dictionary<string, (Tensor A, Tensor B)>();
        var entries = new List<(string, TensorDType, long[], byte[])>();
        foreach (var (module, r) in ranks)
        {
            long outF = module.EndsWith("k_proj") || module.EndsWith("v_proj") ? c.NumKeyValueHeads * c.HeadDim
                : module.EndsWith("gate_proj") || module.EndsWith("up_proj") ? c.IntermediateSize : c.HiddenSize;
            long inF = module.EndsWith("down_proj") ? c.IntermediateSize : module.EndsWith("o_proj") ? c.NumAttentionHeads * c.HeadDim : c.HiddenSize;
            var a = randn([r, inF], generator: gen) * 0.2;
            var b = randn([outF, r], generator: gen) * 0.2;
            result[module] = (a, b);
            entries.Add(($"{Prefix}{module}.lora_A.weight", TensorDType.F32, a.shape, a.contiguous().bytes.ToArray()));
            entries.Add(($"{Prefix}{module}.lora_B.weight", TensorDType.F32, b.shape, b.contiguous().bytes.ToArray()));
        }
        SafetensorsWriter.WriteFile(Path.Combine(dir, PeftAdapter.WeightsFile), entries, new Dictionary<string, string> { ["format"] = "pt" });
        File.WriteAllText(Path.Combine(dir, PeftAdapter.ConfigFile), config.ToJsonString());
        return result;
    }

    /// <summary>The base weights with scale·B·A added for each module, computed in float64.</summary>
    private static Dictionary<string, Tensor> Merged(Dictionary<string, Tensor> weights, Dictionary<string, (Tensor A, Tensor B)> adapter, IReadOnlyDictionary<string, double> scale)
    {
        var merged = new Dictionary<string, Tensor>(weights);
        foreach (var (module, (a, b)) in adapter)
        {
            var key = module + ".weight";
            merged[key] = (weights[key].to(ScalarType.Float64) + b.to(ScalarType.Float64).matmul(a.to(ScalarType.Float64)) * scale[module]).to(ScalarType.Float32);
        }
        return merged;
    }

    private static Dictionary<string, Tensor> BaseWeights(LlamaConfig c)
    {
        using var probe = LlamaForCausalLM.CreateRandom(c, 8, quantize: false, computeDType: ScalarType.Float32, initStd: 0.1);
        return probe.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
    }

    private static Tensor Logits(LlamaForCausalLM m)
    {
        m.eval();
        return m.Logits(tensor(new long[] { 4, 8, 15, 16, 23, 42, 7 }).unsqueeze(0))[0];
    }

    // r = 4, lora_alpha = 8; rank_pattern gives every q_proj rank 2 and layer 1's down_proj rank 6 (a key with dots matches a
    // dot-delimited suffix of the module name); alpha_pattern gives o_proj alpha 3 and, by a regex, layer 0's up_proj alpha 20.
    private static readonly Dictionary<string, int> PatternRanks = new()
    {
        ["model.layers.0.self_attn.q_proj"] = 2, ["model.layers.1.self_attn.q_proj"] = 2,
        ["model.layers.0.self_attn.o_proj"] = 4, ["model.layers.1.self_attn.o_proj"] = 4,
        ["model.layers.0.mlp.up_proj"] = 4, ["model.layers.1.mlp.up_proj"] = 4,
        ["model.layers.0.mlp.down_proj"] = 4, ["model.layers.1.mlp.down_proj"] = 6,
    };

    private static readonly Dictionary<string, double> PatternScales = new()
    {
        ["model.layers.0.self_attn.q_proj"] = 8.0 / 2, ["model.layers.1.self_attn.q_proj"] = 8.0 / 2,
        ["model.layers.0.self_attn.o_proj"] = 3.0 / 4, ["model.layers.1.self_attn.o_proj"] = 3.0 / 4,
        ["model.layers.0.mlp.up_proj"] = 20.0 / 4, ["model.layers.1.mlp.up_proj"] = 8.0 / 4,
        ["model.layers.0.mlp.down_proj"] = 8.0 / 4, ["model.layers.1.mlp.down_proj"] = 8.0 / 6,
    };

    private static JsonObject PatternConfig() => JsonNode.Parse("""
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none",
         "target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"], "use_rslora": false, "use_dora": false,
         "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
         "alpha_pattern": {"self_attn.o_proj": 3, "model\\.layers\\.0\\.mlp\\.up_.*": 20},
         "modules_to_save": null, "layers_to_transform": null, "init_lora_weights": true, "fan_in_fan_out": false,
         "inference_mode": true, "base_model_name_or_path": null, "megatron_config": null, "loftq_config": {}}
        """)!.AsObject();

    [Fact]
    public void RankAndAlphaPatternsApplyPerModuleWhenLoading()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var c = TinyLlama.Config();
        var w = BaseWeights(c);
        var adapter = WriteAdapter(dir.File("adapter"), c, PatternConfig(), PatternRanks, 5);
        using var model = LlamaForCausalLM.FromWeights(c, n => w.GetValueOrDefault(n), quantize: false, computeDType: ScalarType.Float32);
        PeftAdapter.Load(model, dir.File("adapter"));
        var merged = Merged(w, adapter, PatternScales);
        using var reference = LlamaForCausalLM.FromWeights(c, n => merged.GetValueOrDefault(n), quantize: false, computeDType: ScalarType.Float32);
        double rel = Linear4bitTests.RelErr(Logits(model), Logits(reference).to(ScalarType.Float64));
        Assert.True(rel < 1e-5, $"relative error {rel}");
        foreach (var (name, layer) in model.LoraLayers)
            Assert.Equal(PatternScales[name], layer.Scaling("default"), 12);
    }

    [Fact]
    public void RankAndAlphaPatternsApplyPerModuleWhenMerging()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var c = TinyLlama.Config();
        var w = BaseWeights(c);
        Directory.CreateDirectory(dir.File("base"));
        SafetensorsWriter.WriteFile(dir.File("base/model.safetensors"),
            w.Select(kv => (kv.Key, TensorDType.F32, kv.Value.shape, kv.Value.contiguous().bytes.ToArray())));
        File.WriteAllText(dir.File("base/config.json"), new JsonObject
        {
            ["architectures"] = new JsonArray("LlamaForCausalLM"), ["hidden_size"] = c.HiddenSize, ["intermediate_size"] = c.IntermediateSize,
            ["num_hidden_layers"] = c.NumHiddenLayers, ["num_attention_heads"] = c.NumAttentionHeads, ["num_key_value_heads"] = c.NumKeyValueHeads,
            ["vocab_size"] = c.VocabSize, ["rms_norm_eps"] = c.RmsNormEps, ["tie_word_embeddings"] = false, ["torch_dtype"] = "float32",
        }.ToJsonString());
        var adapter = WriteAdapter(dir.File("adapter"), c, PatternConfig(), PatternRanks, 6);
        var report = AdapterMerger.Merge(dir.File("base"), dir.File("adapter"), dir.File("merged"), FloatType.Float32);
        Assert.Equal(PatternRanks.Count, report.Merged);
        var expected = Merged(w, adapter, PatternScales);
        using var merged = SafetensorsReader.Open(dir.File("merged/model.safetensors"));
        foreach (var module in PatternRanks.Keys)
        {
            var key = module + ".weight";
            using var actual = TorchDTypes.FromBytes(merged.GetSpan(key), merged.GetInfo(key));
            Assert.True(Linear4bitTests.RelErr(actual, expected[key].to(ScalarType.Float64)) < 1e-6, key);
        }

        // An adapter whose tensor rank disagrees with rank_pattern is refused, naming the module.
        var wrong = PatternConfig();
        wrong["rank_pattern"] = new JsonObject { ["q_proj"] = 3 };
        File.WriteAllText(dir.File("adapter/" + PeftAdapter.ConfigFile), wrong.ToJsonString());
        var e = Assert.Throws<InvalidDataException>(() => AdapterMerger.Merge(dir.File("base"), dir.File("adapter"), dir.File("merged2"), FloatType.Float32));
        Assert.Contains("q_proj", e.Message);
        Assert.False(Directory.Exists(dir.File("merged2")));
    }

    [Fact]
    public void TrainingWithPatternsSavesThemAndTheSavedAdapterLoadsBack()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var job = JobConfiguration.LoadTrainJob(WriteJob(dir, """
            "Lora": { "Rank": 4, "Alpha": 8, "TargetModules": ["q_proj", "o_proj", "up_proj", "down_proj"],
                      "RankPattern": { "q_proj": 2, "layers.1.mlp.down_proj": 6 },
                      "AlphaPattern": { "self_attn.o_proj": 3, "model\\.layers\\.0\\.mlp\\.up_.*": 20 } }
            """), environment: false);
        var options = TrainingRun.LoraOptionsOf(job.Lora);
        var c = TinyLlama.Config();
        using var model = LlamaForCausalLM.CreateRandom(c, 9, quantize: false, computeDType: ScalarType.Float32);
        model.ApplyLora(options, new Generator(2));
        foreach (var (name, layer) in model.LoraLayers)
        {
            Assert.Equal(PatternRanks[name], layer.LoraA("default").shape[0]);
            Assert.Equal(PatternScales[name], layer.Scaling("default"), 12);
        }
        using (no_grad())
            foreach (var (_, p) in model.TrainableParameters()) p.normal_(0, 0.1, generator: new Generator(3));
        PeftAdapter.Save(model, options, dir.File("saved"));
        var saved = JsonNode.Parse(File.ReadAllText(dir.File("saved/" + PeftAdapter.ConfigFile)))!.AsObject();
        Assert.Equal(2, saved["rank_pattern"]!["q_proj"]!.GetValue<int>());
        Assert.Equal(6, saved["rank_pattern"]!["layers.1.mlp.down_proj"]!.GetValue<int>());
        Assert.Equal(3, saved["alpha_pattern"]!["self_attn.o_proj"]!.GetValue<int>());
        Assert.Equal(20, saved["alpha_pattern"]!["model\\.layers\\.0\\.mlp\\.up_.*"]!.GetValue<int>());

        using var reloaded = LlamaForCausalLM.CreateRandom(c, 9, quantize: false, computeDType: ScalarType.Float32);
        PeftAdapter.Load(reloaded, dir.File("saved"));
        Assert.Equal(0, Linear4bitTests.RelErr(Logits(model), Logits(reloaded).to(ScalarType.Float64)), 7);

        var bad = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(WriteJob(dir, """ "Lora": { "RankPattern": { "q_proj": 0 } } """), environment: false));
        Assert.Contains("Lora:RankPattern:q_proj", bad.Message);
        bad = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(WriteJob(dir, """ "Lora": { "AlphaPattern": { "q_proj": "big" } } """), environment: false));
        Assert.Contains("Lora:AlphaPattern:q_proj", bad.Message);
    }

    [Fact]
    public void TargetRegexWithLayersToTransformIsRefusedNamingBothKeys()
    {
        using var dir = new TempFolder();
        var e = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(WriteJob(dir, """
            "Lora": { "TargetRegex": ".*q_proj", "LayersToTransform": [0] }
            """), environment: false));
        Assert.Contains("Lora:TargetRegex", e.Message);
        Assert.Contains("Lora:LayersToTransform", e.Message);
        // The same in an adapter_config.json: PEFT raises, so do we.
        var c = JsonNode.Parse("""{"peft_type": "LORA", "r": 4, "target_modules": ".*q_proj", "layers_to_transform": [0]}""")!.AsObject();
        Directory.CreateDirectory(dir.File("a"));
        File.WriteAllText(dir.File("a/" + PeftAdapter.ConfigFile), c.ToJsonString());
        var e2 = Assert.Throws<FormatException>(() => PeftAdapter.ReadOptions(dir.File("a")));
        Assert.Contains("layers_to_transform", e2.Message);
        Assert.Contains("target_modules", e2.Message);
    }

    private static IReadOnlyList<string> Targets(LoraOptions o) =>
        Enumerable.Range(0, 2).SelectMany(l => new[] { "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj" }
            .Select(p => $"model.layers.{l}.{p}")).Where(o.IsTarget).ToList();

    [Fact]
    public void TargetAndExcludeModulesMatchAsPeftMatchesThem()
    {
        // A list entry matches a full name or a dot-delimited suffix.
        Assert.Equal(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"],
            Targets(new LoraOptions { TargetModules = ["self_attn.q_proj", "layers.1.mlp.up_proj"] }));
        Assert.Empty(Targets(new LoraOptions { TargetModules = ["attn.q_proj"] })); // not at a dot boundary
        // exclude_modules: a list (names or suffixes) or a regex (full match).
        Assert.Equal(["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"],
            Targets(new LoraOptions { TargetModules = ["q_proj", "v_proj"], ExcludeModules = ["layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"] }));
        Assert.Equal(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"],
            Targets(new LoraOptions { TargetModules = ["q_proj", "v_proj"], ExcludeRegex = @".*layers\.1\..*v_proj" }));
        // layers_to_transform reads the first numbered part, or the one after layers_pattern; a full name bypasses it.
        Assert.Equal(["model.layers.1.self_attn.q_proj"], Targets(new LoraOptions { TargetModules = ["q_proj"], LayersToTransform = [1] }));
        Assert.Equal(["model.layers.1.self_attn.q_proj"], Targets(new LoraOptions { TargetModules = ["q_proj"], LayersToTransform = [1], LayersPattern = ["layers"] }));
        Assert.Empty(Targets(new LoraOptions { TargetModules = ["q_proj"], LayersToTransform = [1], LayersPattern = ["h"] }));
        Assert.Equal(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
            Targets(new LoraOptions { TargetModules = ["q_proj", "model.layers.0.self_attn.q_proj"], LayersToTransform = [1] }));
    }

    private static LoraOptions ReadConfig(TempFolder dir, string json)
    {
        var folder = dir.File("cfg" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(folder);
        File.WriteAllText(Path.Combine(folder, PeftAdapter.ConfigFile), json);
        return PeftAdapter.ReadOptions(folder);
    }

    [Fact]
    public void AdapterConfigFieldsAreReadOrRefusedByName()
    {
        using var dir = new TempFolder();
        // all-linear, a missing target_modules (PEFT's Llama default), exclude_modules in both forms, layers_pattern.
        Assert.Equal(LoraOptions.AllLinear, ReadConfig(dir, """{"peft_type": "LORA", "target_modules": "all-linear"}""").TargetModules);
        Assert.Null(ReadConfig(dir, """{"peft_type": "LORA", "target_modules": "all-linear"}""").TargetRegex);
        Assert.Equal(["q_proj", "v_proj"], ReadConfig(dir, """{"peft_type": "LORA"}""").TargetModules);
        var o = ReadConfig(dir, """
            {"peft_type": "LORA", "target_modules": ["self_attn.q_proj", "v_proj"], "exclude_modules": ["layers.0.self_attn.q_proj"],
             "layers_to_transform": 1, "layers_pattern": "layers", "modules_to_save": null, "megatron_config": null, "loftq_config": {},
             "lora_bias": false, "use_qalora": false, "qalora_group_size": 16, "trainable_token_indices": null, "layer_replication": null,
             "eva_config": null, "corda_config": null, "target_parameters": null, "init_lora_weights": "gaussian", "fan_in_fan_out": false,
             "runtime_config": {"ephemeral_gpu_offload": false}, "some_future_flag": false, "peft_version": "0.18.0"}
            """);
        Assert.Equal(["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], Targets(o));
        Assert.Equal(".*mlp.*", ReadConfig(dir, """{"peft_type": "LORA", "exclude_modules": ".*mlp.*"}""").ExcludeRegex);

        // Set to anything active, these are refused, naming the field.
        foreach (var (field, value) in new[]
                 {
                     ("modules_to_save", "[\"lm_head\"]"), ("modules_to_save", "\"embed_tokens\""), ("trainable_token_indices", "[1, 2]"), ("layer_replication", "[[0, 1]]"),
                     ("lora_bias", "true"), ("use_qalora", "true"), ("bias", "\"all\""), ("init_lora_weights", "\"pissa\""),
                     ("init_lora_weights", "\"olora\""), ("target_parameters", "[\"experts.down_proj\"]"), ("megatron_config", "{\"a\": 1}"),
                     ("some_future_field", "3"), ("layers_pattern", "\"layers\""),
                 })
        {
            var e = Assert.Throws<FormatException>(() => ReadConfig(dir, $$"""{"peft_type": "LORA", "target_modules": ["q_proj"], "{{field}}": {{value}}}"""));
            Assert.Contains(field, e.Message);
            Assert.Contains(PeftAdapter.ConfigFile, e.Message);
        }
    }

    [Fact]
    public void DottedTargetsAndExcludesTrainSaveAndLoadBack()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var job = JobConfiguration.LoadTrainJob(WriteJob(dir, """
            "Lora": { "Rank": 2, "TargetModules": ["self_attn.q_proj", "mlp.down_proj"], "ExcludeModules": ["layers.0.mlp.down_proj"] }
            """), environment: false);
        var options = TrainingRun.LoraOptionsOf(job.Lora);
        var plan = TrainingRun.PlanOptionsOf(job); // the planner sees the projection kinds the dotted names select
        Assert.Equal(["q_proj", "down_proj"], plan.LoraTargets);
        plan.Validate();
        var c = TinyLlama.Config();
        using var model = LlamaForCausalLM.CreateRandom(c, 11, quantize: false, computeDType: ScalarType.Float32);
        var names = model.ApplyLora(options, new Generator(1));
        Assert.Equal(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"], names);
        using (no_grad())
            foreach (var (_, p) in model.TrainableParameters()) p.normal_(0, 0.1, generator: new Generator(3));
        PeftAdapter.Save(model, options, dir.File("saved"));
        var saved = JsonNode.Parse(File.ReadAllText(dir.File("saved/" + PeftAdapter.ConfigFile)))!.AsObject();
        Assert.Equal("""["mlp.down_proj","self_attn.q_proj"]""", saved["target_modules"]!.ToJsonString());
        Assert.Equal("""["layers.0.mlp.down_proj"]""", saved["exclude_modules"]!.ToJsonString());
        using var reloaded = LlamaForCausalLM.CreateRandom(c, 11, quantize: false, computeDType: ScalarType.Float32);
        PeftAdapter.Load(reloaded, dir.File("saved"));
        Assert.Equal(names, reloaded.LoraLayers.Select(l => l.Name));
        Assert.Equal(0, Linear4bitTests.RelErr(Logits(model), Logits(reloaded).to(ScalarType.Float64)), 7);
    }

    internal static string WriteJob(TempFolder dir, string sections)
    {
        var path = dir.File("job.json");
        File.WriteAllText(path, $$"""{ "Model": { "Path": "m" }, "Data": { "TrainFile": "t.jsonl" }, "Output": { "Dir": "o" }, {{sections}} }""");
        return path;
    }
}
