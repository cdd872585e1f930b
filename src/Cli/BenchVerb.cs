using System.CommandLine;

namespace QLora.Cli;

/// <summary><c>qlora bench ...</c>: measurements, each ending with one JSON line of its figures.</summary>
internal static class BenchVerb
{
    public static Command Create(TextWriter stdout)
    {
        var bench = new Command("bench", "Benchmarks (speed and memory), reported as ratios measured in the same run.");
        bench.Subcommands.Add(DequantBenchmark.Create(stdout));
        bench.Subcommands.Add(TrainBenchmarkVerb.Create(stdout));
        bench.Subcommands.Add(MemoryBenchmarkVerb.Create(stdout));
        bench.Subcommands.Add(EvalBenchmarkVerb.Create(stdout));
        bench.Subcommands.Add(QualityBenchmarkVerb.Create(stdout));
        bench.Subcommands.Add(TokenizerBenchmarkVerb.Create(stdout));
        bench.Subcommands.Add(AllReduceBenchmarkVerb.Create(stdout));
        return bench;
    }
}
