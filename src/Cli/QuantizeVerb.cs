using System.CommandLine;
using System.Diagnostics;
using QLora.Quant;

namespace QLora.Cli;

/// <summary>
/// <c>qlora quantize</c>: a safetensors file or HF model folder → a bitsandbytes 4-bit checkpoint. Each option not given
/// on the command line comes from the <c>Quantize</c> section of the job file (<c>--config</c>, default ./appsettings.json).
/// </summary>
internal static class QuantizeVerb
{
    public static Command Create(TextWriter stdout)
    {
        var config = new Option<string?>("--config") { Description = "job file whose Quantize section supplies defaults (default: ./appsettings.json)" };
        var input = new Option<string?>("--input") { Description = "a .safetensors file or a Hugging Face model folder" };
        var output = new Option<string?>("--output") { Description = "the .safetensors file or folder to write" };
        var quantType = new Option<string?>("--quant-type") { Description = "nf4 (default) or fp4" };
        quantType.AcceptOnlyFromAmong("nf4", "fp4");
        var blocksize = new Option<int?>("--blocksize") { Description = "elements per absmax block: 32, 64 (default), ..., 4096" };
        var doubleQuant = new Option<bool?>("--double-quant") { Description = "double-quantize the absmax: true (default) or false" };
        var include = new Option<string?>("--include") { Description = "regex of tensor names to quantize (2-D float tensors only; default: the q/k/v/o/gate/up/down projections)" };
        var nonFinite = new Option<string?>("--non-finite") { Description = "a weight with NaN/Inf values: stop (default) or warn" };
        nonFinite.AcceptOnlyFromAmong("stop", "warn");
        var overwrite = new Option<bool?>("--overwrite") { Description = "replace an existing output (atomically, once the new one is complete)" };
        var cmd = new Command("quantize", "Quantize Linear weights to NF4/FP4 in the bitsandbytes layout, tensor by tensor.")
        {
            config, input, output, quantType, blocksize, doubleQuant, include, overwrite, nonFinite,
        };
        cmd.SetAction(r =>
        {
            var job = QuantizeJob.Load(r.GetValue(config));
            var options = new QuantizeOptions
            {
                QuantType = QuantTypes.Parse(r.GetValue(quantType) ?? job.QuantType ?? "nf4"),
                Blocksize = r.GetValue(blocksize) ?? job.Blocksize ?? 64,
                DoubleQuant = r.GetValue(doubleQuant) ?? job.DoubleQuant ?? true,
                Include = r.GetValue(include) ?? job.Include ?? QuantizeOptions.DefaultInclude,
                NonFinite = NonFiniteValues.ParsePolicy(r.GetValue(nonFinite) ?? job.NonFinite ?? "stop"),
            };
            try { QuantTypes.ValidateBlocksize(options.Blocksize); }
            catch (ArgumentOutOfRangeException) { throw new ArgumentException($"--blocksize {options.Blocksize}: must be a power of two from 32 to 4096"); }
            options.IncludeRegex();
            string inPath = r.GetValue(input) ?? job.Input ?? throw new ArgumentException("--input is required (or set Quantize:Input in the job file)");
            string outPath = r.GetValue(output) ?? job.Output ?? throw new ArgumentException("--output is required (or set Quantize:Output in the job file)");
            bool replace = r.GetValue(overwrite) ?? job.Overwrite ?? false;

            if (File.Exists(inPath) || Directory.Exists(inPath)) PathOverlap.Refuse("--output", outPath, ("--input", inPath));
            StagedFolder.CleanLeftoversBeside(outPath, stdout.WriteLine);
            var sw = Stopwatch.StartNew();
            CheckpointQuantizer.Report report;
            if (Directory.Exists(inPath)) report = CheckpointQuantizer.QuantizeFolder(inPath, outPath, options, stdout.WriteLine, replace);
            else if (File.Exists(inPath))
            {
                if (!replace && File.Exists(outPath)) throw new IOException($"--output {outPath}: file exists; pass --overwrite to replace it");
                if (Directory.Exists(outPath)) throw new IOException($"--output {outPath}: is a folder; the output of a file must be a file");
                report = CheckpointQuantizer.QuantizeFile(inPath, outPath, options, stdout.WriteLine);
            }
            else throw new FileNotFoundException($"--input {inPath}: no such file or folder");
            sw.Stop();
            stdout.WriteLine($"quantized {report.QuantizedTensors} tensors ({report.QuantizedElements:N0} weights, {options.QuantType.Name()}, blocksize {options.Blocksize}, double quant {(options.DoubleQuant ? "on" : "off")}), copied {report.CopiedTensors}; {report.InputBytes:N0} -> {report.OutputBytes:N0} bytes in {sw.Elapsed.TotalSeconds:F1} s -> {outPath}");
            stdout.WriteLine(Json.Line(new
            {
                verb = "quantize", input = inPath, output = outPath, quant_type = options.QuantType.Name(), blocksize = options.Blocksize,
                double_quant = options.DoubleQuant, quantized_tensors = report.QuantizedTensors, copied_tensors = report.CopiedTensors,
                quantized_weights = report.QuantizedElements, input_bytes = report.InputBytes, output_bytes = report.OutputBytes,
                wall_s = Math.Round(sw.Elapsed.TotalSeconds, 3),
            }));
            return 0;
        });
        return cmd;
    }
}
