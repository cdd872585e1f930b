using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class LlamaModelTests
{
    /// <summary>An independent float64 forward of the HF Llama math, written with explicit loops over heads.</summary>
    internal static Tensor ReferenceLogits(LlamaConfig c, Func<string, Tensor> w, long[] ids)
    {
        using var scope = NewDisposeScope();
        int T = ids.Length, H = c.HiddenSize, hd = c.HeadDim, nh = c.NumAttentionHeads, nkv = c.NumKeyValueHeads;
        Tensor W(string n) => w(n).to(ScalarType.Float64);
        Tensor Norm(Tensor x, string n) => W(n) * (x / (x.pow(2).mean([-1L], keepdim: true) + c.RmsNormEps).sqrt());
        Tensor Lin(Tensor x, string n) { var y = x.matmul(W(n + ".weight").t()); return c.AttentionBias && !n.EndsWith("o_proj") && n.Contains("self_attn") ? y + W(n + ".bias") : y; }
        var h = W("model.embed_tokens.weight").index_select(0, tensor(ids));
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            var rope = c.RopeForLayer(l);
            var inv = RotaryEmbedding.InverseFrequencies(hd, rope.Theta, rope.Scaling).Select(f => (double)f).ToArray();
            string p = $"model.layers.{l}.";
            var x = Norm(h, p + "input_layernorm.weight");
            var q = Lin(x, p + "self_attn.q_proj").view(T, nh, hd);
            var k = Lin(x, p + "self_attn.k_proj").view(T, nkv, hd);
            var v = Lin(x, p + "self_attn.v_proj").view(T, nkv, hd);
            var outs = new List<Tensor>();
            Tensor Rope(Tensor m) // m: [T, hd]
            {
                var r = zeros_like(m);
                for (int t = 0; t < T; t++)
                    for (int i = 0; i < hd / 2; i++)
                    {
                        double a = t * inv[i], cs = Math.Cos(a), sn = Math.Sin(a);
                        var x1 = m[t, i].item<double>(); var x2 = m[t, i + hd / 2].item<double>();
                        r[t, i] = x1 * cs - x2 * sn;
                        r[t, i + hd / 2] = x2 * cs + x1 * sn;
                    }
                return r;
            }
            for (int head = 0; head < nh; head++)
            {
                int kvh = head / (nh / nkv);
                var qh = Rope(q.select(1, head));
                var kh = Rope(k.select(1, kvh));
                var vh = v.select(1, kvh);
                var scores = qh.matmul(kh.t()) / Math.Sqrt(hd);
                var mask = ones(T, T, dtype: ScalarType.Bool).triu(1);
                if (c.SlidingWindowForLayer(l) is int window) mask = mask.logical_or(ones(T, T, dtype: ScalarType.Bool).tril(-window));
                scores = scores.masked_fill(mask, double.NegativeInfinity);
                outs.Add(scores.softmax(-1).matmul(vh));
            }
            var attn = cat(outs, -1);
            h = h + Lin(attn, p + "self_attn.o_proj");
            var y = Norm(h, p + "post_attention_layernorm.weight");
            var g = Lin(y, p + "mlp.gate_proj");
            h = h + Lin(g * g.sigmoid() * Lin(y, p + "mlp.up_proj"), p + "mlp.down_proj");
        }
        h = Norm(h, "model.norm.weight");
        var head2 = c.TieWordEmbeddings ? W("model.embed_tokens.weight") : W("lm_head.weight");
        return h.matmul(head2.t()).MoveToOuterDisposeScope();
    }

    private static Dictionary<string, Tensor> RandomWeights(LlamaConfig c, int seed)
    {
        var weights = new Dictionary<string, Tensor>();
        using var probe = LlamaForCausalLM.CreateRandom(c, seed, quantize: false, computeDType: ScalarType.Float32);
        foreach (var (name, t) in probe.named_parameters()) weights[name] = t.detach().clone();
        // make norms non-trivial
        foreach (var k in weights.Keys.Where(k => k.EndsWith("norm.weight")).ToList()) weights[k] = 1 + 0.1 * randn(c.HiddenSize, generator: new Generator((ulong)k.Length));
        return weights;
    }

    [Theory]
    [InlineData(false, false, false)]
    [InlineData(true, false, false)]
    [InlineData(false, true, false)]
    [InlineData(false, false, true)]
    public void DenseFloat32LogitsMatchAFloat64Reference(bool tied, bool qwen, bool llama3Rope)
    {
        using var scope = NewDisposeScope();
        var rope = llama3Rope ? new RopeScaling("llama3", 8, 1, 4, 16) : null;
        var c = TinyLlama.Config(tied: tied, qwen: qwen, rope: rope);
        var w = RandomWeights(c, 3);
        using var m = LlamaForCausalLM.FromWeights(c, n => w.GetValueOrDefault(n), quantize: false, computeDType: ScalarType.Float32);
        m.eval();
        long[] ids = [1, 5, 9, 33, 2, 63, 7];
        var logits = m.Logits(tensor(ids).unsqueeze(0))[0];
        var reference = ReferenceLogits(c, n => w[n], ids);
        double rel = Linear4bitTests.RelErr(logits, reference);
        Assert.True(rel < 1e-5, $"relative error {rel}");
    }

    [Fact]
    public void Llama3RopeScalingFollowsTheTransformersRule()
    {
        // Hand-checked against transformers' _compute_llama3_parameters: wavelengths below 2048/4 keep their
        // frequency, above 2048/1 are divided by the factor, in between interpolate.
        var plain = RotaryEmbedding.InverseFrequencies(128, 500000, null);
        var scaled = RotaryEmbedding.InverseFrequencies(128, 500000, new RopeScaling("llama3", 8, 1, 4, 8192));
        for (int i = 0; i < plain.Length; i++)
        {
            double wavelen = 2 * Math.PI / plain[i];
            if (wavelen < 8192 / 4.0) Assert.Equal(plain[i], scaled[i]);
            else if (wavelen > 8192 / 1.0) Assert.Equal(plain[i] / 8, scaled[i], 1e-12);
            else
            {
                double s = (8192 / wavelen - 1) / 3;
                Assert.Equal((1 - s) * plain[i] / 8 + s * plain[i], scaled[i], 1e-9);
            }
        }
        Assert.Equal(1f, plain[0]);
        Assert.Equal(Math.Pow(500000, -2.0 / 128), plain[1], 1e-6);
    }

    [Fact]
    public void WithBZeroTheAdaptedModelEqualsTheBaseModel()
    {
        using var scope = NewDisposeScope();
        var c = TinyLlama.Config();
        using var m = LlamaForCausalLM.CreateRandom(c, 5);
        m.eval();
        var ids = tensor(new long[] { 3, 4, 5, 6, 7, 8 }).unsqueeze(0);
        var before = m.Logits(ids);
        var names = m.ApplyLora(new LoraOptions { Rank = 4, Alpha = 8 }, new Generator(1));
        Assert.Equal(2 * 7, names.Count);
        var after = m.Logits(ids);
        Assert.True(before.eq(after).all().item<bool>());
    }

    [Theory]
    [InlineData(false)] // the CPU path: the checkpoint saves and restores the CPU generator's state
    [InlineData(true)]  // the CUDA path, run on the CPU: no state is saved; each layer reseeds the generator (see below for the control)
    public void CheckpointingOnAndOffGiveTheSameLossAndLoraGradientsWithDropout(bool reseedPerLayer)
    {
        using var scope = NewDisposeScope();
        var c = TinyLlama.Config();
        var results = new List<(float Loss, Tensor[] Grads)>();
        foreach (bool checkpointing in new[] { true, false })
        {
            var m = LlamaForCausalLM.CreateRandom(c, 6);
            m.ApplyLora(new LoraOptions { Rank = 4, Alpha = 8, Dropout = 0.2, Init = "gaussian" }, new Generator(2));
            m.train();
            m.GradientCheckpointing = checkpointing;
            m.ReseedDropout = reseedPerLayer;
            torch.manual_seed(77);
            var ids = tensor(new long[,] { { 1, 2, 3, 4, 5, 6, 7, 8 }, { 9, 10, 11, 12, 13, 14, 15, 16 } });
            var (sum, tokens) = m.Loss(ids, ids);
            var loss = sum / tokens;
            Checkpoint.Backward(loss);
            results.Add((loss.item<float>(), m.TrainableParameters().Select(p => p.Parameter.grad!.clone()).ToArray()));
        }
        Assert.Equal(results[0].Loss, results[1].Loss);
        Assert.Equal(28, results[0].Grads.Length);
        for (int i = 0; i < results[0].Grads.Length; i++)
            Assert.True(results[0].Grads[i].eq(results[1].Grads[i]).all().item<bool>(), $"gradient {i} differs");
        Assert.Contains(results[0].Grads, g => g.abs().sum().item<float>() > 0);
    }

    [Fact]
    public void ChunkedLossEqualsUnchunkedFloat32CrossEntropy()
    {
        using var scope = NewDisposeScope();
        var c = TinyLlama.Config();
        using var m = LlamaForCausalLM.CreateRandom(c, 7);
        m.eval();
        var ids = tensor(new long[,] { { 1, 2, 3, 4, 5, 6, 7, 8, 9 } });
        var labels = ids.clone();
        labels[0, 3] = -100;
        labels[0, 7] = -100;
        m.LossChunkTokens = 3;
        var (sum, tokens) = m.Loss(ids, labels);
        Assert.Equal(6, tokens);
        var logits = m.Logits(ids)[0].to(ScalarType.Float32);
        double expected = 0;
        var lsm = logits.log_softmax(-1);
        for (int t = 0; t < 8; t++)
        {
            long y = labels[0, t + 1].item<long>();
            if (y != -100) expected -= lsm[t, y].item<float>();
        }
        Assert.Equal(expected, sum.item<float>(), 3);
    }

    [Fact]
    public void PackedSequencesWithABlockDiagonalMaskAndResetPositionsEqualSeparateRuns()
    {
        using var scope = NewDisposeScope();
        var c = TinyLlama.Config();
        using var m = LlamaForCausalLM.CreateRandom(c, 10, quantize: true, computeDType: ScalarType.Float32);
        m.eval();
        long[] a = [5, 6, 7, 8, 9], b = [20, 21, 22];
        var separateA = m.Logits(tensor(a).unsqueeze(0))[0];
        var separateB = m.Logits(tensor(b).unsqueeze(0))[0];
        var packed = tensor(a.Concat(b).ToArray()).unsqueeze(0);
        var positions = tensor(new long[] { 0, 1, 2, 3, 4, 0, 1, 2 }).unsqueeze(0);
        var segment = tensor(new long[] { 0, 0, 0, 0, 0, 1, 1, 1 });
        var mask = segment.unsqueeze(0).eq(segment.unsqueeze(1)).logical_and(ones(8, 8, dtype: ScalarType.Bool).tril()).view(1, 1, 8, 8);
        var logits = m.Logits(packed, positions, mask)[0];
        Assert.True(logits.narrow(0, 0, 5).allclose(separateA, 1e-4, 1e-5));
        Assert.True(logits.narrow(0, 5, 3).allclose(separateB, 1e-4, 1e-5));
    }

    [Fact]
    public void LoraTargetsFollowNamesRegexAndLayerIndices()
    {
        var o = new LoraOptions { TargetModules = ["q_proj", "v_proj"], LayersToTransform = [1] };
        Assert.True(o.IsTarget("model.layers.1.self_attn.q_proj"));
        Assert.False(o.IsTarget("model.layers.0.self_attn.q_proj"));
        Assert.False(o.IsTarget("model.layers.1.self_attn.k_proj"));
        var r = new LoraOptions { TargetRegex = @".*\.mlp\.(gate|up)_proj" };
        Assert.True(r.IsTarget("model.layers.0.mlp.gate_proj"));
        Assert.False(r.IsTarget("model.layers.0.mlp.down_proj"));
        using var m = LlamaForCausalLM.CreateRandom(TinyLlama.Config(layers: 3), 8);
        var names = m.ApplyLora(o);
        Assert.Equal(["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], names);
        Assert.Equal(4, m.TrainableParameters().Count);
        Assert.All(m.TrainableParameters(), p => Assert.Matches(@"^model\.layers\.1\.self_attn\.[qv]_proj\.lora_[AB]\.default\.weight$", p.Name));
        Assert.Throws<ArgumentException>(() => m.ApplyLora(new LoraOptions { TargetModules = ["nothing"] }));
    }

    [Fact]
    public void LoraPlusPutsTheBMatricesInAGroupWithAScaledLearningRate()
    {
        using var m = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 9);
        m.ApplyLora(new LoraOptions { Rank = 2 });
        var groups = m.ParameterGroups(1e-4, loraPlusRatio: 16);
        Assert.Equal(2, groups.Count);
        Assert.Equal(1e-4, groups[0].LearningRate);
        Assert.Equal(1.6e-3, groups[1].LearningRate!.Value, 12);
        Assert.All(groups[0].Parameters, p => Assert.Contains(".lora_A.", p.Name));
        Assert.All(groups[1].Parameters, p => Assert.Contains(".lora_B.", p.Name));
        Assert.Equal(14, groups[1].Parameters.Count);
        Assert.Single(m.ParameterGroups(1e-4));
    }

    [Fact]
    public void AnExceptionInACheckpointedRecomputeSurfacesAfterBackwardWithoutKillingTheProcess()
    {
        using var scope = NewDisposeScope();
        int calls = 0;
        var w = randn(4, 4).requires_grad_(true);
        var x = randn(2, 4).requires_grad_(true);
        var y = Checkpoint.Run((input, _) =>
        {
            if (++calls == 2) throw new InvalidDataException("recompute failed on purpose");
            return input.matmul(w);
        }, x);
        var e = Assert.Throws<InvalidOperationException>(() => Checkpoint.Backward(y.sum()));
        Assert.Contains("recompute failed on purpose", e.Message);
        // The next backward works again.
        var y2 = Checkpoint.Run((input, _) => input.matmul(w), x);
        Checkpoint.Backward(y2.sum());
        Assert.NotNull(w.grad);
    }

    [Fact]
    public void ConfigIsReadFromHfFieldsWithClearErrors()
    {
        var json = JsonNode.Parse("""
            {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
             "tie_word_embeddings": false}
            """)!.AsObject();
        var c = LlamaConfig.FromJson(json);
        Assert.Equal(8, c.HeadDim);
        Assert.Equal(2, c.NumKeyValueHeads);
        Assert.Equal("llama3", c.RopeScaling!.Type);
        Assert.Equal(1e6, c.RopeTheta);
        json["architectures"] = new JsonArray("GPT2LMHeadModel");
        Assert.Contains("LlamaForCausalLM", Assert.Throws<FormatException>(() => LlamaConfig.FromJson(json)).Message);
        json["architectures"] = new JsonArray("LlamaForCausalLM");
        json.Remove("hidden_size");
        Assert.Contains("hidden_size", Assert.Throws<FormatException>(() => LlamaConfig.FromJson(json)).Message);
        json["hidden_size"] = "big";
        Assert.Contains("hidden_size", Assert.Throws<FormatException>(() => LlamaConfig.FromJson(json)).Message);
        json["hidden_size"] = 64;
        json["num_key_value_heads"] = 3;
        Assert.Contains("num_key_value_heads", Assert.Throws<FormatException>(() => LlamaConfig.FromJson(json)).Message);
    }

    [Fact]
    public void AWeightOfTheWrongShapeIsNamed()
    {
        var c = TinyLlama.Config();
        var w = RandomWeights(c, 3);
        w["model.layers.1.mlp.up_proj.weight"] = randn(10, 10);
        var e = Assert.Throws<ArgumentException>(() => LlamaForCausalLM.FromWeights(c, n => w.GetValueOrDefault(n)));
        Assert.Contains("model.layers.1.mlp.up_proj.weight", e.Message);
    }
}
