using System.Text.Json.Nodes;
using static QLora.Examples.PretrainTiny.Calendar;

namespace QLora.Examples.PretrainTiny;

/// <summary>
/// The fine-tuning task: convert a long-form date to ISO 8601 ("March 7, 2021" → "2021-03-07"), as instruction
/// samples. Train and eval dates are disjoint.
/// </summary>
internal static class QuickStartTask
{
    public const string Instruction = "Convert the date to ISO format (YYYY-MM-DD).";

    public static void Write(string folder, int trainCount, int evalCount, int seed)
    {
        Directory.CreateDirectory(folder);
        var rng = new Random(seed);
        var seen = new HashSet<DateOnly>();
        List<string> Take(int n)
        {
            var lines = new List<string>();
            while (lines.Count < n)
            {
                var d = RandomDate(rng);
                if (!seen.Add(d)) continue;
                lines.Add(new JsonObject { ["instruction"] = Instruction, ["input"] = Long(d), ["output"] = Iso(d) }.ToJsonString());
            }
            return lines;
        }
        var eval = Take(evalCount);
        var train = Take(trainCount);
        File.WriteAllText(Path.Combine(folder, "train.jsonl"), string.Join("\n", train) + "\n");
        File.WriteAllText(Path.Combine(folder, "eval.jsonl"), string.Join("\n", eval) + "\n");
    }
}
