using System.CommandLine;
using QLora.Quant.Gguf;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary><c>qlora export gguf</c>: a base model folder (+ a PEFT adapter) → one GGUF file for llama.cpp, Ollama, LM Studio.</summary>
internal static class ExportVerb
{
    public static Command Create(TextWriter stdout)
    {
        var baseOpt = new Option<string>("--base") { Description = "the base model folder (dense or bnb-4bit) with its tokenizer", Required = true };
        var adapter = new Option<string?>("--adapter") { Description = "a PEFT LoRA adapter folder to merge in" };
        var output = new Option<string>("--output") { Description = "the .gguf file to write", Required = true };
        var type = new Option<string>("--type") { Description = "f16 (default), bf16, q8_0, q4_0 or q4_k_m", DefaultValueFactory = _ => "f16" };
        type.AcceptOnlyFromAmong([.. GgufFileTypes.Names]);
        var overwrite = new Option<bool>("--overwrite") { Description = "replace an existing output file once the new one is complete" };
        var gguf = new Command("gguf", "Merge an adapter into its base layer by layer and write one GGUF file (llama.cpp's names, tokenizer, chat template and quantized types).")
        {
            baseOpt, adapter, output, type, overwrite,
        };
        gguf.SetAction(r =>
        {
            string b = r.GetValue(baseOpt)!, o = r.GetValue(output)!;
            string? a = r.GetValue(adapter);
            if (!Directory.Exists(b)) throw new DirectoryNotFoundException($"--base {b}: no such folder");
            if (a is not null && !Directory.Exists(a)) throw new DirectoryNotFoundException($"--adapter {a}: no such folder");
            var fileType = GgufFileTypes.Parse(r.GetValue(type)!);
            var report = GgufExporter.Export(b, a, o, fileType, r.GetValue(overwrite), stdout.WriteLine);
            stdout.WriteLine($"wrote {o}: {report.Tensors} tensors, {report.Merged} merged with the adapter, {report.OutputBytes:N0} bytes");
            stdout.WriteLine(Json.Line(new
            {
                verb = "export gguf", type = fileType.Name(), tensors = report.Tensors, merged = report.Merged, bytes = report.OutputBytes,
                tensor_types = report.TypeCounts.OrderBy(c => c.Key).ToDictionary(c => c.Key.Name(), c => c.Value),
            }));
            return 0;
        });
        return new Command("export", "Export a trained model to another runtime's format.") { gguf };
    }
}
