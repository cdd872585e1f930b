// Writes a small, reproducible, randomly initialised Llama-architecture model in the Hugging Face layout:
// config.json, generation_config.json and model.safetensors (bf16), as `qlora quantize` and the loaders expect.
//   dotnet run --project examples/TinyRandomLlama -- <output-folder> [--seed 42]
using System.Text.Json;
using System.Text.Json.Nodes;
using QLora.Quant;

if (args.Length < 1)
{
    Console.Error.WriteLine("usage: TinyRandomLlama <output-folder> [--seed N]");
    return 2;
}
string outDir = args[0];
int seed = args.Length >= 3 && args[1] == "--seed" ? int.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture) : 42;

const int hidden = 128, intermediate = 352, layers = 4, heads = 4, kvHeads = 2, vocab = 320, headDim = hidden / heads;
var config = new JsonObject
{
    ["architectures"] = new JsonArray("LlamaForCausalLM"),
    ["model_type"] = "llama",
    ["hidden_size"] = hidden,
    ["intermediate_size"] = intermediate,
    ["num_hidden_layers"] = layers,
    ["num_attention_heads"] = heads,
    ["num_key_value_heads"] = kvHeads,
    ["head_dim"] = headDim,
    ["hidden_act"] = "silu",
    ["rms_norm_eps"] = 1e-5,
    ["rope_theta"] = 10000.0,
    ["rope_scaling"] = null,
    ["max_position_embeddings"] = 512,
    ["vocab_size"] = vocab,
    ["tie_word_embeddings"] = false,
    ["attention_bias"] = false,
    ["mlp_bias"] = false,
    ["bos_token_id"] = 1,
    ["eos_token_id"] = 2,
    ["torch_dtype"] = "bfloat16",
    ["initializer_range"] = 0.02,
};

var rng = new Random(seed);
var tensors = new List<(string, TensorDType, long[], byte[])>();
void Add(string name, params long[] shape)
{
    long n = shape.Aggregate(1L, (a, d) => a * d);
    var values = new float[n];
    bool norm = name.EndsWith("norm.weight", StringComparison.Ordinal);
    for (long i = 0; i < n; i++)
    {
        if (norm) { values[i] = 1f; continue; }
        double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
        values[i] = (float)(0.02 * Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2));
    }
    var bytes = new byte[n * 2];
    FloatTypes.FromFloat32(values, FloatType.BFloat16, bytes);
    tensors.Add((name, TensorDType.BF16, shape, bytes));
}

Add("model.embed_tokens.weight", vocab, hidden);
for (int l = 0; l < layers; l++)
{
    string p = $"model.layers.{l}.";
    Add(p + "input_layernorm.weight", hidden);
    Add(p + "self_attn.q_proj.weight", heads * headDim, hidden);
    Add(p + "self_attn.k_proj.weight", kvHeads * headDim, hidden);
    Add(p + "self_attn.v_proj.weight", kvHeads * headDim, hidden);
    Add(p + "self_attn.o_proj.weight", hidden, heads * headDim);
    Add(p + "post_attention_layernorm.weight", hidden);
    Add(p + "mlp.gate_proj.weight", intermediate, hidden);
    Add(p + "mlp.up_proj.weight", intermediate, hidden);
    Add(p + "mlp.down_proj.weight", hidden, intermediate);
}
Add("model.norm.weight", hidden);
Add("lm_head.weight", vocab, hidden);

Directory.CreateDirectory(outDir);
SafetensorsWriter.WriteFile(Path.Combine(outDir, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
var indented = new JsonSerializerOptions { WriteIndented = true };
File.WriteAllText(Path.Combine(outDir, "config.json"), config.ToJsonString(indented) + "\n");
File.WriteAllText(Path.Combine(outDir, "generation_config.json"),
    new JsonObject { ["bos_token_id"] = 1, ["eos_token_id"] = 2, ["do_sample"] = false }.ToJsonString(indented) + "\n");
long parameters = tensors.Sum(t => t.Item3.Aggregate(1L, (a, d) => a * d));
Console.WriteLine($"wrote {outDir}: {tensors.Count} tensors, {parameters:N0} parameters (bf16, seed {seed})");
return 0;
