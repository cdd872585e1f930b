using System.Text.Json.Nodes;
using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// <see cref="WeightedAdapterMerger"/> against a float64 reference of each PEFT combination written here, on small
/// hand-sized adapters (2 modules, ranks 2–4, different alphas, rsLoRA and alpha_pattern for the scalings).
/// </summary>
public class AdapterArithmeticTests
{
    const string Q = "model.layers.0.self_attn.q_proj", D = "model.layers.0.mlp.down_proj";
    static readonly (string Name, int Out, int In)[] Small = [(Q, 6, 5), (D, 4, 7)];

    /// <summary>An adapter as written: A [r, in] and B [out, r] per module (float32 values held as doubles).</summary>
    internal sealed record Adapter(string Folder, int Rank, double Alpha, bool RsLora, Dictionary<string, (double[,] A, double[,] B)> Modules,
        Dictionary<string, double> AlphaPattern)
    {
        public double Scaling(string module)
        {
            double alpha = AlphaPattern.TryGetValue(module, out var a) ? a : Alpha;
            return RsLora ? alpha / Math.Sqrt(Rank) : alpha / Rank;
        }
    }

    internal static Adapter Write(string folder, int rank, double alpha, int seed, string[]? only = null, bool rsLora = false,
        Dictionary<string, double>? alphaPattern = null, (string Name, int Out, int In)[]? shapes = null, double scale = 1)
    {
        Directory.CreateDirectory(folder);
        var rng = new Random(seed);
        double[,] Random(int rows, int cols)
        {
            var m = new double[rows, cols];
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < cols; j++) m[i, j] = (float)((rng.NextDouble() * 2 - 1) * scale);
            return m;
        }
        var modules = new Dictionary<string, (double[,], double[,])>();
        var tensors = new List<(string, TensorDType, long[], byte[])>();
        foreach (var (name, outDim, inDim) in shapes ?? Small)
        {
            if (only is not null && !only.Contains(name)) continue;
            var a = Random(rank, inDim);
            var b = Random(outDim, rank);
            modules[name] = (a, b);
            tensors.Add(($"base_model.model.{name}.lora_A.weight", TensorDType.F32, [rank, inDim], Bytes(a)));
            tensors.Add(($"base_model.model.{name}.lora_B.weight", TensorDType.F32, [outDim, rank], Bytes(b)));
        }
        SafetensorsWriter.WriteFile(Path.Combine(folder, "adapter_model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        var config = new JsonObject
        {
            ["peft_type"] = "LORA", ["r"] = rank, ["lora_alpha"] = alpha, ["use_rslora"] = rsLora, ["bias"] = "none",
            ["target_modules"] = new JsonArray(modules.Keys.Select(k => (JsonNode?)k).ToArray()), ["task_type"] = "CAUSAL_LM",
            ["alpha_pattern"] = new JsonObject((alphaPattern ?? []).Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
            ["peft_version"] = "0.17.0",
        };
        File.WriteAllText(Path.Combine(folder, "adapter_config.json"), config.ToJsonString());
        return new Adapter(folder, rank, alpha, rsLora, modules, alphaPattern ?? []);
    }

    static byte[] Bytes(double[,] m)
    {
        var f = m.Cast<double>().Select(v => (float)v).ToArray();
        var bytes = new byte[f.Length * 4];
        Buffer.BlockCopy(f, 0, bytes, 0, bytes.Length);
        return bytes;
    }

    internal static (JsonObject Config, Dictionary<string, (double[,] A, double[,] B)> Modules) ReadResult(string folder)
    {
        var config = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "adapter_config.json")))!;
        using var reader = SafetensorsReader.Open(Path.Combine(folder, "adapter_model.safetensors"));
        var modules = new Dictionary<string, (double[,], double[,])>();
        foreach (var t in reader.Tensors.Where(t => t.Name.EndsWith(".lora_A.weight", StringComparison.Ordinal)))
        {
            var module = t.Name["base_model.model.".Length..^".lora_A.weight".Length];
            var bInfo = reader.GetInfo($"base_model.model.{module}.lora_B.weight");
            modules[module] = (Matrix(reader.Read<float>(t.Name), t.Shape), Matrix(reader.Read<float>(bInfo.Name), bInfo.Shape));
        }
        return (config, modules);
    }

    static double[,] Matrix(float[] values, long[] shape)
    {
        var m = new double[shape[0], shape[1]];
        for (int i = 0; i < shape[0]; i++)
            for (int j = 0; j < shape[1]; j++) m[i, j] = values[i * shape[1] + j];
        return m;
    }

    // ---- the float64 reference ----

    static double[,] MatMul(double[,] x, double[,] y)
    {
        var z = new double[x.GetLength(0), y.GetLength(1)];
        for (int i = 0; i < x.GetLength(0); i++)
            for (int j = 0; j < y.GetLength(1); j++)
            {
                double s = 0;
                for (int k = 0; k < x.GetLength(1); k++) s += x[i, k] * y[k, j];
                z[i, j] = s;
            }
        return z;
    }

    static double[,] Scale(double[,] x, double c) => Map(x, v => v * c);
    static double[,] Map(double[,] x, Func<double, double> f)
    {
        var z = new double[x.GetLength(0), x.GetLength(1)];
        for (int i = 0; i < x.GetLength(0); i++)
            for (int j = 0; j < x.GetLength(1); j++) z[i, j] = f(x[i, j]);
        return z;
    }
    static double[,] Add(double[,] x, double[,] y)
    {
        var z = (double[,])x.Clone();
        for (int i = 0; i < x.GetLength(0); i++)
            for (int j = 0; j < x.GetLength(1); j++) z[i, j] += y[i, j];
        return z;
    }
    static double[,] Transpose(double[,] x)
    {
        var z = new double[x.GetLength(1), x.GetLength(0)];
        for (int i = 0; i < x.GetLength(0); i++)
            for (int j = 0; j < x.GetLength(1); j++) z[j, i] = x[i, j];
        return z;
    }
    static double FrobeniusSquared(double[,] x) => x.Cast<double>().Sum(v => v * v);
    static double[,] Delta(Adapter a, string module) => Scale(MatMul(a.Modules[module].B, a.Modules[module].A), a.Scaling(module));

    static double[,] WeightedDeltaSum(Adapter[] adapters, double[] w, string module)
    {
        var some = adapters.First(a => a.Modules.ContainsKey(module)).Modules[module];
        var sum = new double[some.B.GetLength(0), some.A.GetLength(1)];
        for (int i = 0; i < adapters.Length; i++)
            if (adapters[i].Modules.ContainsKey(module)) sum = Add(sum, Scale(Delta(adapters[i], module), w[i]));
        return sum;
    }

    /// <summary>Singular values (descending) by cyclic Jacobi on the symmetric XᵀX or XXᵀ, whichever is smaller.</summary>
    static double[] SingularValues(double[,] x)
    {
        var g = x.GetLength(0) <= x.GetLength(1) ? MatMul(x, Transpose(x)) : MatMul(Transpose(x), x);
        int n = g.GetLength(0);
        for (int sweep = 0; sweep < 100; sweep++)
        {
            double off = 0;
            for (int p = 0; p < n; p++)
                for (int q = p + 1; q < n; q++) off += g[p, q] * g[p, q];
            if (off < 1e-30) break;
            for (int p = 0; p < n; p++)
                for (int q = p + 1; q < n; q++)
                {
                    if (Math.Abs(g[p, q]) < 1e-300) continue;
                    double theta = (g[q, q] - g[p, p]) / (2 * g[p, q]);
                    double t = Math.Sign(theta) / (Math.Abs(theta) + Math.Sqrt(theta * theta + 1));
                    if (theta == 0) t = 1;
                    double c = 1 / Math.Sqrt(t * t + 1), s = t * c;
                    for (int k = 0; k < n; k++) // columns p, q
                    {
                        double gkp = g[k, p], gkq = g[k, q];
                        g[k, p] = c * gkp - s * gkq;
                        g[k, q] = s * gkp + c * gkq;
                    }
                    for (int k = 0; k < n; k++) // rows p, q
                    {
                        double gpk = g[p, k], gqk = g[q, k];
                        g[p, k] = c * gpk - s * gqk;
                        g[q, k] = s * gpk + c * gqk;
                    }
                }
        }
        return Enumerable.Range(0, n).Select(i => Math.Sqrt(Math.Max(g[i, i], 0))).OrderDescending().ToArray();
    }

    static double[] Flat(double[,] m) => m.Cast<double>().ToArray();

    static double[] RefPruneMagnitude(double[] t, double density)
    {
        if (density >= 1) return t;
        int k = (int)(density * t.Length);
        var keep = t.Select((v, i) => (v, i)).OrderByDescending(p => Math.Abs(p.v)).Take(k).Select(p => p.i).ToHashSet();
        return t.Select((v, i) => keep.Contains(i) ? v : 0).ToArray();
    }

    static double[] RefPruneDare(double[] t, double density, ulong seed, string key)
    {
        if (density >= 1) return t;
        var g = SplitMix64.ForKey(seed, key); // the same stream the merge draws from: DARE's mask is reproduced, then applied here
        return t.Select(v => g.NextDouble() < density ? v / density : 0).ToArray();
    }

    static double[] RefMerge(string method, double[][] ts, double[] w, bool total)
    {
        int n = ts[0].Length;
        var r = new double[n];
        for (int j = 0; j < n; j++)
        {
            if (method is "linear")
            {
                r[j] = ts.Select((t, i) => t[j] * w[i]).Sum();
                continue;
            }
            double vote = total ? ts.Sum(t => t[j]) : ts.Sum(t => Math.Sign(t[j]));
            int sign = vote >= 0 ? 1 : -1;
            var agreeing = Enumerable.Range(0, ts.Length).Where(i => Math.Sign(ts[i][j]) == sign).ToList();
            r[j] = agreeing.Sum(i => ts[i][j] * w[i]) / Math.Max(agreeing.Count, 1);
        }
        return r;
    }

    /// <summary>PEFT's merge of one side (A or B) or of the deltas, pruned as the combination says.</summary>
    static double[,] RefCombine(string combination, double[][] tensors, double[] w, double density, bool total, ulong seed, string module, string part, int rows, int[] index)
    {
        var pruned = combination switch
        {
            "ties" or "magnitude_prune" => tensors.Select(t => RefPruneMagnitude(t, density)).ToArray(),
            "dare_linear" or "dare_ties" => tensors.Select((t, i) => RefPruneDare(t, density, seed, $"{module}.{part}#{index[i]}")).ToArray(),
            _ => tensors,
        };
        var merged = RefMerge(combination is "ties" or "dare_ties" ? "ties" : "linear", pruned, w, total);
        int cols = merged.Length / rows;
        var m = new double[rows, cols];
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++) m[i, j] = merged[i * cols + j];
        return m;
    }

    static void Close(double[,] expected, double[,] actual, double tol = 2e-6)
    {
        Assert.Equal(expected.GetLength(0), actual.GetLength(0));
        Assert.Equal(expected.GetLength(1), actual.GetLength(1));
        double scale = Math.Max(1e-12, expected.Cast<double>().Max(Math.Abs));
        for (int i = 0; i < expected.GetLength(0); i++)
            for (int j = 0; j < expected.GetLength(1); j++)
                Assert.True(Math.Abs(expected[i, j] - actual[i, j]) <= tol * scale, $"[{i}, {j}]: expected {expected[i, j]}, got {actual[i, j]}");
    }

    static (JsonObject Config, Dictionary<string, (double[,] A, double[,] B)> Modules) Run(TempFolder dir, string name, Adapter[] adapters, AdapterMergeOptions options, string? baseFolder = null)
    {
        WeightedAdapterMerger.Merge(adapters.Select(a => a.Folder).ToList(), options, dir.File(name), baseFolder);
        return ReadResult(dir.File(name));
    }

    static Adapter[] SameRank(TempFolder dir) =>
    [
        Write(dir.File("a1"), 3, 6, seed: 1, alphaPattern: new() { [D] = 12 }),
        Write(dir.File("a2"), 3, 4, seed: 2, rsLora: true),
        Write(dir.File("a3"), 3, 3, seed: 3),
    ];

    // ---- the combinations ----

    [Theory]
    [InlineData("linear")]
    [InlineData("ties")]
    [InlineData("ties-frequency")]
    [InlineData("dare_linear")]
    [InlineData("dare_ties")]
    [InlineData("magnitude_prune")]
    public void ElementWiseKindsMergeAAndBWithPeftsSquareRootWeights(string kind)
    {
        using var dir = new TempFolder();
        var adapters = SameRank(dir);
        double[] w = [0.7, -0.4, 0.5];
        string combination = kind.Replace("-frequency", "");
        bool total = !kind.EndsWith("-frequency", StringComparison.Ordinal);
        double density = combination == "linear" ? 1 : 0.5;
        var options = new AdapterMergeOptions
        {
            Combination = AdapterCombinations.Parse(combination), Weights = w, Density = combination == "linear" ? null : density,
            MajoritySign = combination.Contains("ties") ? (total ? MajoritySignMethod.Total : MajoritySignMethod.Frequency) : null, Seed = 9,
        };
        var (config, modules) = Run(dir, "out", adapters, options);
        Assert.Equal(3, config["r"]!.GetValue<int>());
        Assert.Equal(3, config["lora_alpha"]!.GetValue<double>());
        Assert.False(config["use_rslora"]!.GetValue<bool>());
        Assert.Empty(config["alpha_pattern"]!.AsObject());
        Assert.Equal("0.17.0", config["peft_version"]!.GetValue<string>()); // the first adapter's other fields are kept, as PEFT's replace()
        foreach (var (module, outDim, inDim) in Small)
        {
            // PEFT: √|w·s| on both sides, the sign of w·s on A.
            var ws = adapters.Select((a, i) => w[i] * a.Scaling(module)).ToArray();
            var wb = ws.Select(v => Math.Sqrt(Math.Abs(v))).ToArray();
            var wa = ws.Select((v, i) => v >= 0 ? wb[i] : -wb[i]).ToArray();
            int[] index = [0, 1, 2];
            var a = RefCombine(combination, adapters.Select(x => Flat(x.Modules[module].A)).ToArray(), wa, density, total, 9, module, "lora_A", 3, index);
            var b = RefCombine(combination, adapters.Select(x => Flat(x.Modules[module].B)).ToArray(), wb, density, total, 9, module, "lora_B", outDim, index);
            Close(a, modules[module].A);
            Close(b, modules[module].B);
            if (combination != "linear") Assert.Contains(0.0, modules[module].A.Cast<double>()); // something was pruned
        }
        if (combination.StartsWith("dare", StringComparison.Ordinal))
        {
            // Seeded: the same seed gives the same bytes, another seed other masks.
            WeightedAdapterMerger.Merge(adapters.Select(a => a.Folder).ToList(), options, dir.File("again"));
            Assert.Equal(File.ReadAllBytes(dir.File("out/adapter_model.safetensors")), File.ReadAllBytes(dir.File("again/adapter_model.safetensors")));
            WeightedAdapterMerger.Merge(adapters.Select(a => a.Folder).ToList(), options with { Seed = 10 }, dir.File("other"));
            Assert.NotEqual(File.ReadAllBytes(dir.File("out/adapter_model.safetensors")), File.ReadAllBytes(dir.File("other/adapter_model.safetensors")));
        }
    }

    static Adapter[] MixedRanks(TempFolder dir) =>
    [
        Write(dir.File("m1"), 2, 4, seed: 4),
        Write(dir.File("m2"), 3, 9, seed: 5, rsLora: true),
        Write(dir.File("m3"), 4, 2, seed: 6, only: [Q]), // adapts q_proj only
    ];

    [Fact]
    public void CatIsTheExactWeightedDeltaSumAtTheSumOfTheRanks()
    {
        using var dir = new TempFolder();
        var adapters = MixedRanks(dir);
        double[] w = [0.6, -1.5, 0.8];
        var (config, modules) = Run(dir, "cat", adapters, new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = w });
        Assert.Equal(9, config["r"]!.GetValue<int>());
        Assert.Equal(9, config["lora_alpha"]!.GetValue<double>());
        Assert.Equal([D, Q], config["target_modules"]!.AsArray().Select(n => n!.GetValue<string>()));
        foreach (var (module, outDim, inDim) in Small)
        {
            // A rows: w·s·A of each adapter that has the module, in order, then zeros; B columns: B likewise.
            int row = 0;
            for (int i = 0; i < adapters.Length; i++)
            {
                if (!adapters[i].Modules.TryGetValue(module, out var m)) continue;
                double c = w[i] * adapters[i].Scaling(module);
                for (int r = 0; r < adapters[i].Rank; r++, row++)
                    for (int j = 0; j < inDim; j++)
                    {
                        Assert.Equal((float)(m.A[r, j] * c), modules[module].A[row, j], 6);
                        for (int o = 0; o < outDim && j == 0; o++) Assert.Equal(m.B[o, r], modules[module].B[o, row]);
                    }
            }
            for (; row < 9; row++) Assert.All(Enumerable.Range(0, inDim), j => Assert.Equal(0, modules[module].A[row, j]));
            Close(WeightedDeltaSum(adapters, w, module), MatMul(modules[module].B, modules[module].A));
        }
    }

    [Fact]
    public void SvdIsTheBestRankKApproximationOfTheWeightedDeltaSum()
    {
        using var dir = new TempFolder();
        var adapters = MixedRanks(dir);
        double[] w = [0.6, -1.5, 0.8];
        var (config, modules) = Run(dir, "svd", adapters, new AdapterMergeOptions { Combination = AdapterCombination.Svd, Weights = w });
        Assert.Equal(4, config["r"]!.GetValue<int>()); // the largest input rank, PEFT's default
        foreach (var (module, _, _) in Small)
        {
            var delta = WeightedDeltaSum(adapters, w, module);
            var sigma = SingularValues(delta);
            var (a, b) = modules[module];
            var approx = MatMul(b, a);
            double total = FrobeniusSquared(delta);
            // Eckart–Young: the residual is the energy of the dropped singular values, the kept part that of the top 4.
            double residual = FrobeniusSquared(Add(delta, Scale(approx, -1)));
            Assert.Equal(sigma.Skip(4).Sum(s => s * s) / total, residual / total, 5);
            Assert.Equal(sigma.Take(4).Sum(s => s * s) / total, FrobeniusSquared(approx) / total, 5);
            // PEFT's split: A = Vh (orthonormal rows), B = U·diag(S) (column norms are the singular values).
            Close(Identity(4), MatMul(a, Transpose(a)), 1e-5);
            var columnNorms = Enumerable.Range(0, 4).Select(c => Math.Sqrt(Enumerable.Range(0, b.GetLength(0)).Sum(r => b[r, c] * b[r, c]))).ToArray();
            Assert.All(Enumerable.Range(0, 4), i => Assert.Equal(sigma[i], columnNorms[i], 4));
        }
        Assert.True(SingularValues(WeightedDeltaSum(adapters, w, Q))[4] > 1e-3, "q_proj's delta has rank 5, so rank 4 drops something");

        // A rank at least the delta's gives it exactly (beyond min(out, in) = 5 the factors are zero-padded to the rank asked for).
        var (fullConfig, full) = Run(dir, "svd9", adapters, new AdapterMergeOptions { Combination = AdapterCombination.Svd, Weights = w, SvdRank = 9 });
        Assert.Equal(9, fullConfig["r"]!.GetValue<int>());
        foreach (var (module, _, _) in Small) Close(WeightedDeltaSum(adapters, w, module), MatMul(full[module].B, full[module].A), 1e-5);

        // svd_clamp: both factors limited to ± the quantile of all their values (torch.quantile, linear interpolation).
        var (_, clamped) = Run(dir, "svdclamp", adapters, new AdapterMergeOptions { Combination = AdapterCombination.Svd, Weights = w, SvdClamp = 0.8 });
        foreach (var (module, _, _) in Small)
        {
            var (a, b) = modules[module];
            var all = b.Cast<double>().Concat(a.Cast<double>()).Order().ToArray();
            double pos = 0.8 * (all.Length - 1);
            double hi = all[(int)pos] + (all[(int)Math.Ceiling(pos)] - all[(int)pos]) * (pos - Math.Floor(pos));
            Close(Map(a, v => Math.Clamp(v, -hi, hi)), clamped[module].A, 1e-5);
            Close(Map(b, v => Math.Clamp(v, -hi, hi)), clamped[module].B, 1e-5);
        }
    }

    static double[,] Identity(int n)
    {
        var m = new double[n, n];
        for (int i = 0; i < n; i++) m[i, i] = 1;
        return m;
    }

    [Theory]
    [InlineData("ties_svd")]
    [InlineData("dare_linear_svd")]
    [InlineData("dare_ties_svd")]
    [InlineData("magnitude_prune_svd")]
    public void SvdKindsPruneTheDeltasThenFactorThem(string kind)
    {
        using var dir = new TempFolder();
        var adapters = MixedRanks(dir);
        double[] w = [0.6, -1.5, 0.8];
        var (config, modules) = Run(dir, "out", adapters, new AdapterMergeOptions
        {
            Combination = AdapterCombinations.Parse(kind), Weights = w, Density = 0.6, SvdRank = 5, Seed = 3,
        });
        Assert.Equal(5, config["r"]!.GetValue<int>());
        foreach (var (module, outDim, inDim) in Small)
        {
            var present = Enumerable.Range(0, 3).Where(i => adapters[i].Modules.ContainsKey(module)).ToArray();
            // Deltas s·B·A merged with the weights w (scaling applied once), pruned as the kind says.
            var merged = RefCombine(kind[..^4], present.Select(i => Flat(Delta(adapters[i], module))).ToArray(), present.Select(i => w[i]).ToArray(),
                0.6, total: true, 3, module, "delta", outDim, present);
            var sigma = SingularValues(merged);
            var approx = MatMul(modules[module].B, modules[module].A);
            double total = FrobeniusSquared(merged);
            Assert.Equal(sigma.Skip(5).Sum(s => s * s) / total, FrobeniusSquared(Add(merged, Scale(approx, -1))) / total, 5);
        }
    }

    [Fact]
    public void OneAdapterIsCombinedLinearlyAsPeftDoes()
    {
        using var dir = new TempFolder();
        var a = Write(dir.File("one"), 2, 8, seed: 7);
        var log = new List<string>();
        var report = WeightedAdapterMerger.Merge([a.Folder], new AdapterMergeOptions { Combination = AdapterCombination.Svd, Weights = [-0.5] }, dir.File("out"), log: log.Add);
        Assert.Equal(AdapterCombination.Linear, report.Combination);
        Assert.Contains(log, l => l.Contains("one adapter"));
        var (config, modules) = ReadResult(dir.File("out"));
        Assert.Equal(2, config["r"]!.GetValue<int>());
        foreach (var (module, _, _) in Small) Close(Scale(Delta(a, module), -0.5), MatMul(modules[module].B, modules[module].A));
    }

    static void EditConfig(string folder, Action<JsonObject> edit)
    {
        var path = Path.Combine(folder, "adapter_config.json");
        var config = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        edit(config);
        File.WriteAllText(path, config.ToJsonString());
    }

    [Fact]
    public void TargetModulesSelectExactlyTheMergedModules()
    {
        using var dir = new TempFolder();
        var q = Write(dir.File("q"), 2, 4, seed: 21, only: [Q]);
        var d = Write(dir.File("d"), 2, 4, seed: 22, only: [D]);
        // Regexes are joined as PEFT joins them.
        EditConfig(q.Folder, c => c["target_modules"] = @".*\.q_proj");
        EditConfig(d.Folder, c => c["target_modules"] = @".*\.down_proj");
        var (config, modules) = Run(dir, "regex", [q, d], new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] });
        Assert.Equal(@"(.*\.q_proj)|(.*\.down_proj)", config["target_modules"]!.GetValue<string>());
        Assert.Equal([D, Q], modules.Keys.Order(StringComparer.Ordinal));

        // Short names without restrictions: their union.
        EditConfig(q.Folder, c => c["target_modules"] = new JsonArray("q_proj"));
        EditConfig(d.Folder, c => c["target_modules"] = new JsonArray("down_proj"));
        (config, _) = Run(dir, "union", [q, d], new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] });
        Assert.Equal(["down_proj", "q_proj"], config["target_modules"]!.AsArray().Select(n => n!.GetValue<string>()));

        // A layer restriction on one input would, copied onto the union as PEFT does, drop or add modules: the names themselves are written.
        EditConfig(q.Folder, c => c["layers_to_transform"] = new JsonArray(0));
        (config, _) = Run(dir, "layers", [q, d], new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] });
        Assert.Equal([D, Q], config["target_modules"]!.AsArray().Select(n => n!.GetValue<string>()));
        Assert.Null(config["layers_to_transform"]);
        var options = PeftAdapter.ReadOptions(dir.File("layers"));
        Assert.True(options.IsTarget(Q) && options.IsTarget(D) && !options.IsTarget("model.layers.1.self_attn.q_proj"));
    }

    // ---- with a base: the project's loader reads the result and qlora merge merges it ----

    static readonly (string Name, int Out, int In)[] Tiny = [("model.layers.0.self_attn.q_proj", 32, 32), ("model.layers.1.mlp.down_proj", 32, 64)];

    [Fact]
    public void TheResultLoadsOntoItsBaseAndMergesIntoIt()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        HfModelLoaderTests.WriteFolder(dir.File("base"), TinyLlama.Config());
        Adapter[] adapters = [Write(dir.File("t1"), 4, 8, seed: 11, shapes: Tiny, scale: 0.2), Write(dir.File("t2"), 2, 4, seed: 12, shapes: Tiny, scale: 0.2)];
        double[] w = [0.5, 0.5];
        WeightedAdapterMerger.Merge(adapters.Select(a => a.Folder).ToList(), new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = w },
            dir.File("cat"), baseFolder: dir.File("base"));

        using (var model = HfModelLoader.Load(dir.File("base"), new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 }))
        {
            var options = PeftAdapter.Load(model, dir.File("cat"));
            Assert.Equal(6, options.Rank);
            Assert.Equal(1.0, options.Scaling);
            Assert.Equal(2, model.LoraLayers.Count(l => l.Layer.Adapters.Contains("default")));
        }

        AdapterMerger.Merge(dir.File("base"), dir.File("cat"), dir.File("merged"), FloatType.Float32);
        using var baseCk = SafetensorsCheckpoint.Open(dir.File("base"));
        using var merged = SafetensorsCheckpoint.Open(dir.File("merged"));
        foreach (var (module, outDim, inDim) in Tiny)
        {
            var stored = baseCk.GetInfo(module + ".weight");
            using var w0 = TorchDTypes.FromBytes(baseCk.GetSpan(module + ".weight"), stored).to(ScalarType.Float64);
            var expected = Add(Matrix(w0.to(ScalarType.Float32).data<float>().ToArray(), [outDim, inDim]), WeightedDeltaSum(adapters, w, module));
            var info = merged.GetInfo(module + ".weight");
            var actual = Matrix(MemoryMarshalFloats(merged.GetSpan(module + ".weight")), info.Shape);
            Close(expected, actual, 1e-5);
        }
    }

    static float[] MemoryMarshalFloats(ReadOnlySpan<byte> bytes) => System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).ToArray();

    // ---- refusals ----

    [Fact]
    public void BadInputsAreRefusedBeforeAnythingIsWritten()
    {
        using var dir = new TempFolder();
        var adapters = MixedRanks(dir);
        string[] folders = [adapters[0].Folder, adapters[1].Folder];
        var e = Assert.Throws<ArgumentException>(() => WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Linear, Weights = [1, 1] }, dir.File("x")));
        Assert.Contains("same rank", e.Message);
        Assert.Contains("r = 2, 3", e.Message);
        Assert.False(Directory.Exists(dir.File("x")));

        Assert.Throws<ArgumentException>(() => WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1] }, dir.File("x")));
        Assert.Throws<ArgumentException>(() => WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Ties, Weights = [1, 1], Density = 1.5 }, dir.File("x")));
        Assert.Throws<ArgumentException>(() => WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Ties, Weights = [1, 1] }, dir.File("x")));

        // Adapters of different shapes (different bases).
        var wide = Write(dir.File("wide"), 2, 4, seed: 8, shapes: [(Q, 6, 9), (D, 4, 7)]);
        var shape = Assert.Throws<InvalidDataException>(() => WeightedAdapterMerger.Merge([adapters[0].Folder, wide.Folder], new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] }, dir.File("x")));
        Assert.Contains("different base models", shape.Message);

        // An output inside an input is refused even with overwrite, and the input stays as it was.
        var before = File.ReadAllBytes(Path.Combine(folders[0], "adapter_model.safetensors"));
        Assert.Throws<IOException>(() => WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] }, folders[0], overwrite: true));
        Assert.Throws<IOException>(() => WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] }, Path.Combine(folders[1], "sub"), overwrite: true));
        Assert.Equal(before, File.ReadAllBytes(Path.Combine(folders[0], "adapter_model.safetensors")));

        // An existing output is replaced only with overwrite.
        WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] }, dir.File("out"));
        Assert.Throws<IOException>(() => WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] }, dir.File("out")));
        WeightedAdapterMerger.Merge(folders, new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [2, 1] }, dir.File("out"), overwrite: true);
    }

    [Fact]
    public void ADoraAdapterIsRefusedNamingQloraMerge()
    {
        using var dir = new TempFolder();
        var adapters = MixedRanks(dir);
        var config = Path.Combine(adapters[1].Folder, "adapter_config.json");
        var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(config))!;
        json["use_dora"] = true;
        File.WriteAllText(config, json.ToJsonString());
        var e = Assert.Throws<InvalidDataException>(() => WeightedAdapterMerger.Merge([adapters[0].Folder, adapters[1].Folder],
            new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] }, dir.File("x")));
        Assert.Contains("DoRA adapter", e.Message);
        Assert.Contains("qlora merge", e.Message);
        Assert.False(Directory.Exists(dir.File("x")));
    }

    [Fact]
    public void AnAdapterWhoseConfigSelectsAModuleItLacksIsRefused()
    {
        using var dir = new TempFolder();
        var adapters = MixedRanks(dir);
        // m3 adapts q_proj only; a config that also selects down_proj (which m1 has) makes it incomplete.
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(adapters[2].Folder, "adapter_config.json")))!.AsObject();
        config["target_modules"] = new JsonArray(Q, D);
        File.WriteAllText(Path.Combine(adapters[2].Folder, "adapter_config.json"), config.ToJsonString());
        var e = Assert.Throws<InvalidDataException>(() => WeightedAdapterMerger.Merge([adapters[0].Folder, adapters[2].Folder],
            new AdapterMergeOptions { Combination = AdapterCombination.Cat, Weights = [1, 1] }, dir.File("x")));
        Assert.Contains("incomplete adapter", e.Message);
    }
}
