using System.Diagnostics;
using System.Globalization;

namespace QLora.Trainer.Tests;

/// <summary>
/// The test assembly's entry point (the SDK's generated one is switched off): <c>dotnet QLora.Trainer.Tests.dll
/// measure-step ...</c> measures one QLoRA step in a fresh process and prints the transient peak last; any other call
/// does nothing (test runners load the assembly, they do not run Main).
/// </summary>
public static class CalibrationProgram
{
    public static int Main(string[] args)
    {
        if (args.Length != 20 || args[0] != "measure-step") return 0;
        int[] v = args[1..].Select(a => int.Parse(a, CultureInfo.InvariantCulture)).ToArray();
        var config = StepMemoryMeasurement.Config(v[0], v[1], v[2], v[3], v[4], v[5]);
        var o = new PlanOptions { SequenceLength = v[6], MicroBatch = v[7], LossChunkTokens = v[8], GradientCheckpointing = v[9] != 0, OffloadCheckpoints = v[10] != 0, MlpTileTokens = v[11],
            LoraRank = v[12], LoraDropout = v[13] / 1000.0, OptimizerBits = v[14], PagedOptimizer = v[15] != 0, UseDora = v[16] != 0,
            NormTileTokens = v[17], AttentionByGroup = v[18] != 0 };
        var (_, step) = StepMemoryMeasurement.Measure(config, o, Console.WriteLine);
        Console.WriteLine(step.ToString(CultureInfo.InvariantCulture));
        return 0;
    }

    /// <summary>Runs the measurement in a child process and returns the step's peak above its start.</summary>
    public static long MeasureInFreshProcess(LlamaConfig c, PlanOptions o, Action<string> log)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(typeof(CalibrationProgram).Assembly.Location);
        foreach (var a in new object[] { "measure-step", c.HiddenSize, c.IntermediateSize, c.NumHiddenLayers, c.NumAttentionHeads, c.NumKeyValueHeads,
                     c.VocabSize, o.SequenceLength, o.MicroBatch, o.LossChunkTokens, o.GradientCheckpointing ? 1 : 0, o.OffloadCheckpoints ? 1 : 0, o.MlpTileTokens,
                     o.LoraRank, (int)Math.Round(o.LoraDropout * 1000), o.OptimizerBits, o.PagedOptimizer ? 1 : 0, o.UseDora ? 1 : 0,
                     o.NormTileTokens, o.AttentionByGroup ? 1 : 0 })
            psi.ArgumentList.Add(Convert.ToString(a, CultureInfo.InvariantCulture)!);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        string stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        log(stdout.TrimEnd());
        if (p.ExitCode != 0) throw new InvalidOperationException($"the measuring process failed ({p.ExitCode}): {stderr.Result}");
        return long.Parse(stdout.TrimEnd().Split('\n')[^1], CultureInfo.InvariantCulture);
    }
}
