using System.CommandLine;
using QLora.Quant;

namespace QLora.Cli;

/// <summary><c>qlora dequantize</c>: every bnb 4-bit weight back to a dense tensor under its original name.</summary>
internal static class DequantizeVerb
{
    public static Command Create(TextWriter stdout)
    {
        var input = new Option<string>("--input") { Description = "a quantized .safetensors file", Required = true };
        var output = new Option<string>("--output") { Description = "the .safetensors file to write", Required = true };
        var dtype = new Option<string?>("--dtype") { Description = "float32, bfloat16 or float16 (default: each weight's recorded dtype)" };
        dtype.AcceptOnlyFromAmong("float32", "bfloat16", "float16");
        var cmd = new Command("dequantize", "Turn bnb 4-bit weights back into dense tensors.") { input, output, dtype };
        cmd.SetAction(r =>
        {
            string inPath = r.GetValue(input)!, outPath = r.GetValue(output)!;
            if (!File.Exists(inPath)) throw new FileNotFoundException($"--input {inPath}: no such file");
            FloatType? type = r.GetValue(dtype) is { } d ? FloatTypes.Parse(d) : null;
            var report = CheckpointDequantizer.DequantizeFile(inPath, outPath, type, stdout.WriteLine);
            stdout.WriteLine($"dequantized {report.DequantizedTensors} tensors, copied {report.CopiedTensors}; wrote {report.OutputBytes:N0} bytes to {outPath}");
            return 0;
        });
        return cmd;
    }
}
