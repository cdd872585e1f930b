// Pretrains the bundled tiny base model from scratch on a generated corpus, reproducibly, and writes the quick-start
// fine-tuning dataset. Run from the repository root (Release is ~3x faster):
//   dotnet run --project examples/PretrainTiny -c Release -- [--out models/tiny-llama-base] [--data data/quickstart]
//                                                           [--steps 1500] [--seed 42] [--dataset-only]
using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using QLora.Examples.PretrainTiny;
using QLora.Quant;
using QLora.Trainer;
using TorchSharp;
using static TorchSharp.torch;

string outDir = "models/tiny-llama-base", dataDir = "data/quickstart";
int steps = 1500, seed = 42;
bool datasetOnly = false;
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--out": outDir = args[++i]; break;
        case "--data": dataDir = args[++i]; break;
        case "--steps": steps = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--seed": seed = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--dataset-only": datasetOnly = true; break;
        default:
            Console.Error.WriteLine($"unknown option {args[i]}; usage: PretrainTiny [--out folder] [--data folder] [--steps N] [--seed N] [--dataset-only]");
            return 2;
    }
}

QuickStartTask.Write(dataDir, trainCount: 2000, evalCount: 100, seed: seed + 1);
Console.WriteLine($"wrote {dataDir}/train.jsonl (2000), {dataDir}/eval.jsonl (100) and {dataDir}/choices.jsonl (the 100 eval questions, multiple choice)");
if (datasetOnly) return 0;

const int rowTokens = 128, batch = 16;
var configJson = new JsonObject
{
    ["architectures"] = new JsonArray("LlamaForCausalLM"), ["model_type"] = "llama",
    ["hidden_size"] = 256, ["intermediate_size"] = 688, ["num_hidden_layers"] = 4,
    ["num_attention_heads"] = 4, ["num_key_value_heads"] = 2, ["head_dim"] = 64,
    ["hidden_act"] = "silu", ["rms_norm_eps"] = 1e-5, ["rope_theta"] = 10000.0, ["rope_scaling"] = null,
    ["max_position_embeddings"] = 512, ["vocab_size"] = ByteTokenizerFiles.VocabSize, ["tie_word_embeddings"] = false,
    ["attention_bias"] = false, ["mlp_bias"] = false, ["initializer_range"] = 0.02,
    ["bos_token_id"] = ByteTokenizerFiles.Bos, ["eos_token_id"] = ByteTokenizerFiles.Eos, ["pad_token_id"] = ByteTokenizerFiles.Pad,
    ["torch_dtype"] = "bfloat16", ["transformers_version"] = "4.46.0", ["use_cache"] = true,
};
var config = LlamaConfig.FromJson(configJson);

using var staged = StagedFolder.Create(outDir, overwrite: true);
ByteTokenizerFiles.Write(staged.Path);
using var tokenizer = HfTokenizer.Load(staged.Path);

// The corpus as one token stream of documents, each <s> text </s>, cut into rows.
var rng = new Random(seed);
var stream = new List<long>();
long needed = (long)steps * batch * (rowTokens + 1);
int documents = 0;
while (stream.Count < needed)
{
    foreach (var id in tokenizer.Encode(Corpus.Document(rng), addSpecialTokens: true)) stream.Add(id);
    stream.Add(ByteTokenizerFiles.Eos);
    documents++;
}
Console.WriteLine($"corpus: {documents} generated documents, {stream.Count:N0} tokens; e.g. \"{Corpus.Document(new Random(seed + 7))}\"");

manual_seed(seed);
set_num_threads(Math.Max(1, Environment.ProcessorCount));
using var model = LlamaForCausalLM.CreateRandom(config, seed, quantize: false, computeDType: ScalarType.Float32, initStd: 0.02);
model.GradientCheckpointing = false; // every weight trains, the embedding included
var parameters = model.named_parameters().Select(p => (p.name, p.parameter)).ToList();
foreach (var (_, p) in parameters) p.requires_grad = true;
long count = parameters.Sum(p => p.parameter.numel());
Console.WriteLine($"model: {count:N0} parameters ({config.NumHiddenLayers} layers, hidden {config.HiddenSize}, vocab {config.VocabSize})");
using var optimizer = new BnbAdamW([new ParameterGroup(parameters)], new AdamWOptions { LearningRate = 3e-3, WeightDecay = 0.01, Beta2 = 0.98 });
var schedule = new LearningRateSchedule("cosine", WarmupSteps: 50, TotalSteps: steps, MinRatio: 0.1);
model.train();
var sw = Stopwatch.StartNew();
var recent = new Queue<double>();
for (int step = 0; step < steps; step++)
{
    using var scope = NewDisposeScope();
    var rows = new long[batch * (rowTokens + 1)];
    stream.CopyTo(step * rows.Length, rows, 0, rows.Length);
    var all = tensor(rows, [batch, rowTokens + 1]);
    var ids = all.narrow(1, 0, rowTokens);
    var (sum, tokens) = model.Loss(ids, ids); // labels are the ids (shifted inside); the last column only feeds the shift
    var loss = sum / tokens;
    loss.backward();
    double norm = Math.Sqrt(parameters.Sum(p => { using var g = p.parameter.grad!; return g.square().sum().item<float>(); }));
    if (norm > 1.0)
        foreach (var (_, p) in parameters) { using var g = p.grad!; g.mul_((float)(1.0 / norm)).Dispose(); }
    optimizer.LearningRateScale = schedule.Factor(step);
    optimizer.Step();
    optimizer.ZeroGrad();
    recent.Enqueue(loss.item<float>());
    if (recent.Count > 50) recent.Dequeue();
    if ((step + 1) % 50 == 0 || step == 0)
        Console.WriteLine($"step {step + 1}/{steps}: loss {recent.Average():F4} (mean of last {recent.Count}), {sw.Elapsed.TotalSeconds:F0} s");
}
double finalLoss = recent.Average();

// A sample continuation, for the log.
model.eval();
var prompt = tokenizer.Encode("Grace was born on", addSpecialTokens: true);
var continuation = TextGenerator.Generate(model, prompt, new GenerationOptions { MaxNewTokens = 40, StopTokenIds = [ByteTokenizerFiles.Eos] });
Console.WriteLine($"sample: Grace was born on{tokenizer.Decode(continuation)}");

// The folder in the Hugging Face layout: bf16 weights, config, generation config, tokenizer files.
var tensors = parameters.Select(p =>
{
    using var bf16 = p.parameter.detach().to(ScalarType.BFloat16).contiguous();
    return (p.name, TensorDType.BF16, p.parameter.shape, bf16.bytes.ToArray());
}).ToList();
SafetensorsWriter.WriteFile(Path.Combine(staged.Path, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
var indented = new System.Text.Json.JsonSerializerOptions { WriteIndented = true };
File.WriteAllText(Path.Combine(staged.Path, "config.json"), configJson.ToJsonString(indented));
File.WriteAllText(Path.Combine(staged.Path, "generation_config.json"), new JsonObject
{
    ["bos_token_id"] = ByteTokenizerFiles.Bos, ["eos_token_id"] = ByteTokenizerFiles.Eos, ["pad_token_id"] = ByteTokenizerFiles.Pad, ["transformers_version"] = "4.46.0",
}.ToJsonString(indented));
staged.Commit();
Console.WriteLine($"wrote {outDir}: {count:N0} parameters, final pretraining loss {finalLoss:F4} after {steps} steps ({(long)steps * batch * rowTokens:N0} tokens) in {sw.Elapsed.TotalSeconds:F0} s");
return 0;
