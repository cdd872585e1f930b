using QLora.Trainer;

namespace QLora.Cli;

/// <summary>The loss curve of a run (train loss per step, eval loss per evaluation) as a PNG in the output folder.</summary>
internal static class LossCurvePlot
{
    /// <summary>Writes <paramref name="path"/>; a run without steps writes nothing and returns false.</summary>
    public static bool Write(TrainerState state, string path, string title)
    {
        var steps = state.History.Where(h => !h.Skipped && double.IsFinite(h.Loss)).ToList();
        if (steps.Count == 0) return false;
        var plot = new ScottPlot.Plot();
        var train = plot.Add.Scatter(steps.Select(h => (double)h.Step).ToArray(), steps.Select(h => h.Loss).ToArray());
        train.LegendText = "train loss";
        train.MarkerSize = steps.Count > 50 ? 0 : 4;
        var evals = state.EvalHistory.Where(e => double.IsFinite(e.Loss)).ToList();
        if (evals.Count > 0)
        {
            var eval = plot.Add.Scatter(evals.Select(e => (double)e.Step).ToArray(), evals.Select(e => e.Loss).ToArray());
            eval.LegendText = "eval loss";
            eval.MarkerSize = 7;
        }
        plot.Title(title);
        plot.XLabel("optimizer step");
        plot.YLabel("loss (nats per target token)");
        plot.ShowLegend();
        var tmp = Quant.WriteLeftovers.TempPathFor(Path.GetFullPath(path)); // a name the next run recognises as a leftover
        try
        {
            plot.SavePng(tmp, 900, 540);
            Quant.FileReplace.ReplaceFile(tmp, path);
        }
        catch
        {
            try { File.Delete(tmp); } catch (IOException) { } // a full disk: the old plot stays, no half-written one
            throw;
        }
        return true;
    }
}
