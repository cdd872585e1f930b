using System.Text.Json.Nodes;
using QLora.Quant;

namespace QLora.Cli.Tests;

/// <summary>Writes a tiny Llama-shaped Hugging Face folder (random bf16 weights), single-file or sharded.</summary>
internal static class TinyHfFolder
{
    public const int Hidden = 64, Intermediate = 128, Layers = 2, Vocab = 96;

    public static Dictionary<string, (TensorDType DType, long[] Shape, byte[] Data)> Write(string dir, bool sharded = false, int seed = 1, int vocab = Vocab)
    {
        Directory.CreateDirectory(dir);
        var rng = new Random(seed);
        var tensors = new Dictionary<string, (TensorDType, long[], byte[])>();
        void Add(string name, TensorDType dtype, params long[] shape)
        {
            long n = shape.Aggregate(1L, (a, d) => a * d);
            var f = new float[n];
            for (int i = 0; i < n; i++) f[i] = (float)(rng.NextDouble() * 2 - 1) * 0.05f;
            var fd = FloatTypes.FromTensorDType(dtype)!.Value;
            var bytes = new byte[n * fd.Size()];
            FloatTypes.FromFloat32(f, fd, bytes);
            tensors[name] = (dtype, shape, bytes);
        }
        Add("model.embed_tokens.weight", TensorDType.BF16, vocab, Hidden);
        for (int l = 0; l < Layers; l++)
        {
            var p = $"model.layers.{l}.";
            Add(p + "input_layernorm.weight", TensorDType.BF16, Hidden);
            Add(p + "self_attn.q_proj.weight", TensorDType.BF16, Hidden, Hidden);
            Add(p + "self_attn.k_proj.weight", TensorDType.BF16, Hidden / 2, Hidden);
            Add(p + "self_attn.v_proj.weight", TensorDType.F16, Hidden / 2, Hidden);
            Add(p + "self_attn.o_proj.weight", TensorDType.F32, Hidden, Hidden);
            Add(p + "post_attention_layernorm.weight", TensorDType.BF16, Hidden);
            Add(p + "mlp.gate_proj.weight", TensorDType.BF16, Intermediate, Hidden);
            Add(p + "mlp.up_proj.weight", TensorDType.BF16, Intermediate, Hidden);
            Add(p + "mlp.down_proj.weight", TensorDType.BF16, Hidden, Intermediate + 1 - 1);
        }
        Add("model.norm.weight", TensorDType.BF16, Hidden);
        Add("lm_head.weight", TensorDType.BF16, vocab, Hidden);

        var meta = new Dictionary<string, string> { ["format"] = "pt" };
        if (!sharded)
        {
            SafetensorsWriter.WriteFile(Path.Combine(dir, "model.safetensors"), tensors.Select(kv => (kv.Key, kv.Value.Item1, kv.Value.Item2, kv.Value.Item3)), meta);
        }
        else
        {
            var names = tensors.Keys.OrderBy(k => k, StringComparer.Ordinal).ToList();
            var map = new JsonObject();
            for (int s = 0; s < 2; s++)
            {
                var file = $"model-0000{s + 1}-of-00002.safetensors";
                var part = names.Where((_, i) => i % 2 == s).ToList();
                SafetensorsWriter.WriteFile(Path.Combine(dir, file), part.Select(k => (k, tensors[k].Item1, tensors[k].Item2, tensors[k].Item3)), meta);
                foreach (var k in part) map[k] = file;
            }
            var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = tensors.Values.Sum(t => t.Item3.LongLength) }, ["weight_map"] = map };
            File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), index.ToJsonString());
        }
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray("LlamaForCausalLM"), ["model_type"] = "llama", ["hidden_size"] = Hidden,
            ["intermediate_size"] = Intermediate, ["num_hidden_layers"] = Layers, ["num_attention_heads"] = 4,
            ["num_key_value_heads"] = 2, ["vocab_size"] = vocab, ["torch_dtype"] = "bfloat16",
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), "{\"version\": \"1.0\"}");
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), "{}");
        return tensors;
    }
}
