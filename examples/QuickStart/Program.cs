// QLoRA fine-tuning through the library API: the same job as `dotnet run --project src/Cli -- train` with the root
// appsettings.json, written as code. Run from the repository root:
//   dotnet run --project examples/QuickStart [-- --steps N]
using QLora.Trainer;

int steps = args.Length >= 2 && args[0] == "--steps" ? int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture) : 0;

// 1. The job: the bundled 4-bit-quantized-on-load base, LoRA on every linear layer, the bundled task.
var job = JobConfiguration.LoadTrainJob("appsettings.json", environment: false);
job.Output.Dir = Path.GetFullPath("out/quickstart-example");
job.Output.Overwrite = true;
if (steps > 0) job.Training.MaxSteps = steps;

// 2. Train: progress lines, exact match before and after, checkpoints, the adapter in PEFT format.
var result = TrainingRun.Run(job, new TrainingRun.RunOptions
{
    Log = Console.WriteLine,
    Progress = p => { if (p.Step % 25 == 0 || p.Step == p.TotalSteps) Console.WriteLine($"step {p.Step}/{p.TotalSteps} loss {p.Loss:F4}"); },
});
Console.WriteLine($"exact match {result.Summary.ExactMatchBefore:P0} -> {result.Summary.ExactMatchAfter:P0}; adapter in {result.Summary.OutputDir}");

// 3. Use the adapter: load the base (quantized on load), attach the adapter, answer a held-out question.
using var tokenizer = HfTokenizer.Load(job.Model.Path!);
using var model = HfModelLoader.Load(job.Model.Path!);
PeftAdapter.Load(model, result.Summary.OutputDir);
var template = tokenizer.GetChatTemplate(job.Model.ChatTemplate);
var sample = JsonlDataset.Read(job.Data.EvalFile!).Samples[0];
var prompt = tokenizer.Encode(template.Render(sample.PromptMessages, addGenerationPrompt: true), addSpecialTokens: false);
var answer = TextGenerator.Generate(model, prompt, new GenerationOptions { MaxNewTokens = 32, StopTokenIds = tokenizer.EosTokenIds });
Console.WriteLine($"{sample.PromptMessages[^1].Content.ReplaceLineEndings(" ")} -> {tokenizer.Decode(answer).Trim()} (expected {sample.ReferenceAnswer})");
