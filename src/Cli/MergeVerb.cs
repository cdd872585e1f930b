using System.CommandLine;
using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary><c>qlora merge</c>: a base model folder + a PEFT adapter → a standalone merged HF folder.</summary>
internal static class MergeVerb
{
    public static Command Create(TextWriter stdout)
    {
        var baseOpt = new Option<string>("--base") { Description = "the base model folder (dense or bnb-4bit)", Required = true };
        var adapter = new Option<string>("--adapter") { Description = "the PEFT adapter folder", Required = true };
        var output = new Option<string>("--output") { Description = "the folder to write", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "bfloat16 (default) or float16", DefaultValueFactory = _ => "bfloat16" };
        dtype.AcceptOnlyFromAmong("bfloat16", "float16");
        var quantize = new Option<string?>("--quantize") { Description = "re-quantize the merged model: nf4" };
        quantize.AcceptOnlyFromAmong("nf4");
        var overwrite = new Option<bool>("--overwrite") { Description = "replace an existing output folder once the new one is complete" };
        var device = DeviceOptions.Device("accepted for symmetry with the other verbs; merging always runs on the CPU, one layer at a time through host memory");
        var cmd = new Command("merge", "Merge a LoRA adapter into its base (W + scaling·B·A; DoRA: each row rescaled to m / ‖W + scaling·B·A‖), layer by layer, into a standalone Hugging Face folder.")
        {
            baseOpt, adapter, output, dtype, quantize, overwrite, device,
        };
        cmd.SetAction(r =>
        {
            string b = r.GetValue(baseOpt)!, a = r.GetValue(adapter)!, o = r.GetValue(output)!;
            InputPaths.RequireFolder("--base", b, "a Hugging Face model folder");
            InputPaths.RequireFolder("--adapter", a, "a PEFT adapter folder");
            PathOverlap.Refuse("--output", o, ("--base", b), ("--adapter", a));
            StagedFolder.CleanLeftoversBeside(o, stdout.WriteLine);
            if (DeviceRequest.Parse(r.GetValue(device), "--device").Kind == DeviceRequestKind.Cuda)
                stdout.WriteLine("merge runs on the CPU: it reads, merges and writes one layer at a time, bound by disk and host memory, so a GPU would not speed it up");
            var report = AdapterMerger.Merge(b, a, o, FloatTypes.Parse(r.GetValue(dtype)!), r.GetValue(quantize) is not null,
                r.GetValue(overwrite), stdout.WriteLine);
            stdout.WriteLine($"wrote {o}: {report.Merged} projections merged, {report.Copied} tensors copied, {report.OutputBytes:N0} bytes");
            return 0;
        });
        return cmd;
    }
}
