using System.CommandLine;
using System.CommandLine.Parsing;

namespace QLora.Cli;

/// <summary>Entry point of the <c>qlora</c> command: one verb per job, errors as one line on stderr.</summary>
public static class Program
{
    /// <summary>
    /// Runs one verb and returns the process exit code: 0 success, 1 failure (one line on stderr, details in a log
    /// file), 2 usage error; <c>qlora train</c> adds 130 (interrupted, checkpoint saved) and 3 (aborted by a second Ctrl-C).
    /// </summary>
    public static int Main(string[] args)
    {
        if (LibTorchStartup.Refusal(args) is { } refusal)
        {
            Console.Error.WriteLine($"qlora: {refusal}");
            return 1;
        }
        return Run(args, Console.Out, Console.Error);
    }

    /// <summary>Runs with explicit output streams (used by tests).</summary>
    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var root = new RootCommand("QLora.NET: QLoRA fine-tuning of Llama-family models with NF4 base weights, in .NET.")
        {
            TrainVerb.Create(stdout),
            QuantizeVerb.Create(stdout),
            DequantizeVerb.Create(stdout),
            InspectVerb.Create(stdout),
            MergeVerb.Create(stdout),
            MergeAdaptersVerb.Create(stdout),
            ExportVerb.Create(stdout),
            GenerateVerb.Create(stdout),
            EvalVerb.Create(stdout),
            PlanVerb.Create(stdout),
            BenchVerb.Create(stdout),
            DoctorVerb.Create(stdout),
        };
        // Read before parsing by LibTorchStartup (a module initializer); declared here so every verb accepts it.
        root.Options.Add(new Option<string>("--libtorch")
        {
            Description = "Folder of a libtorch to run on, e.g. a PyTorch installation's .../site-packages/torch/lib (also QLORA_LIBTORCH); needs a qlora built with -p:TorchBackend=external.",
            Recursive = true,
        });
        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            var verb = parse.CommandResult.Command == root ? "qlora" : $"qlora {VerbPath(parse.CommandResult)}";
            stderr.WriteLine($"{verb}: {OneLine(parse.Errors[0].Message)} (see '{verb} --help')");
            return 2;
        }
        try
        {
            return parse.Invoke(new InvocationConfiguration { Output = stdout, Error = stderr, EnableDefaultExceptionHandler = false });
        }
        catch (Exception e)
        {
            return CliErrors.Report($"qlora {VerbPath(parse.CommandResult)}", e, stderr);
        }
    }

    // System.CommandLine lists allowed values on separate, tab-indented lines.
    private static string OneLine(string message) => string.Join(' ', message.Split(['\r', '\n', '\t'], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));

    // "export gguf" for a sub-verb, "train" for a verb.
    private static string VerbPath(CommandResult result)
    {
        var names = new List<string>();
        for (SymbolResult? s = result; s is CommandResult c && c.Command is not RootCommand; s = c.Parent) names.Insert(0, c.Command.Name);
        return string.Join(' ', names);
    }
}
