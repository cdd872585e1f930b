using System.CommandLine;
using System.Diagnostics;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary><c>qlora generate</c>: text from a model folder (optionally with a PEFT adapter), for evaluation and demos.</summary>
internal static class GenerateVerb
{
    public static Command Create(TextWriter stdout)
    {
        var model = new Option<string>("--model") { Description = "a Hugging Face model folder (dense or bnb-4bit) with tokenizer.json", Required = true };
        var adapter = new Option<string?>("--adapter") { Description = "a PEFT adapter folder to apply" };
        var prompt = new Option<string>("--prompt") { Description = "the prompt text", Required = true };
        var chat = new Option<bool>("--chat") { Description = "wrap the prompt as a user turn with the model's chat template" };
        var template = new Option<string?>("--template") { Description = "chat template by name (llama3, llama3.1, chatml, mistral, alpaca) instead of the detected one" };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "most tokens to generate", DefaultValueFactory = _ => 64 };
        var temperature = new Option<double>("--temperature") { Description = "0 = greedy (default)", DefaultValueFactory = _ => 0 };
        var topK = new Option<int>("--top-k") { Description = "sample among the k most likely tokens (0 = off)", DefaultValueFactory = _ => 0 };
        var topP = new Option<double>("--top-p") { Description = "nucleus sampling threshold (1 = off)", DefaultValueFactory = _ => 1.0 };
        var seed = new Option<ulong>("--seed") { Description = "sampling seed", DefaultValueFactory = _ => 42UL };
        var device = DeviceOptions.Device();
        var cmd = new Command("generate", "Generate text with a KV cache; greedy or temperature/top-k/top-p sampling; stops at EOS.")
        {
            model, adapter, prompt, chat, template, maxNew, temperature, topK, topP, seed, device,
        };
        cmd.SetAction(r =>
        {
            string folder = r.GetValue(model)!;
            var options = new GenerationOptions
            {
                MaxNewTokens = r.GetValue(maxNew), Temperature = r.GetValue(temperature), TopK = r.GetValue(topK),
                TopP = r.GetValue(topP), Seed = r.GetValue(seed),
            };
            options.Validate();
            if (!Directory.Exists(folder)) throw new DirectoryNotFoundException($"--model {folder}: no such folder");
            var on = DeviceSelector.Resolve(r.GetValue(device), "--device", stdout.WriteLine);
            using var tokenizer = HfTokenizer.Load(folder);
            using var m = HfModelLoader.Load(folder, new HfModelLoader.Options { Device = on.Torch });
            tokenizer.EnsureMatchesEmbedding((int)m.Config.VocabSize);
            if (r.GetValue(adapter) is { } a) PeftAdapter.Load(m, a);
            int[] ids;
            if (r.GetValue(chat) || r.GetValue(template) is not null)
            {
                var t = tokenizer.GetChatTemplate(r.GetValue(template));
                var text = t.Render([new ChatMessage("user", r.GetValue(prompt)!)], addGenerationPrompt: true);
                ids = tokenizer.Encode(text, addSpecialTokens: false); // the template writes BOS itself
            }
            else ids = tokenizer.Encode(r.GetValue(prompt)!, addSpecialTokens: true);
            var sw = Stopwatch.StartNew();
            var output = TextGenerator.Generate(m, ids, options with { StopTokenIds = tokenizer.EosTokenIds, VocabLimit = tokenizer.VocabSize });
            sw.Stop();
            stdout.WriteLine(tokenizer.Decode(output, skipSpecialTokens: true));
            stdout.WriteLine(Json.Line(new
            {
                verb = "generate", device = on.Name, prompt_tokens = ids.Length, new_tokens = output.Count,
                stopped_at_eos = output.Count > 0 && tokenizer.EosTokenIds.Contains(output[^1]),
                tokens_per_s = Math.Round(output.Count / Math.Max(sw.Elapsed.TotalSeconds, 1e-9), 1),
            }));
            return 0;
        });
        return cmd;
    }
}
