using System.Text.Json.Nodes;
using static QLora.Examples.PretrainTiny.Calendar;

namespace QLora.Examples.PretrainTiny;

/// <summary>
/// The fine-tuning task: the month of a long-form date as its two-digit number ("March 7, 2021" → "03"), as
/// instruction samples. Train and eval dates are disjoint. The base knows the pieces (where a date's month is, and
/// "March is month 03") but has never been asked this question in a prompt and answers it 0 % of the time.
/// (A full ISO conversion needs exact copying of the digits, which a 3 M-parameter model pretrained for ten minutes does
/// only approximately: it gets the month right and the year and day off by a few.)
/// </summary>
internal static class QuickStartTask
{
    public const string Instruction = "Write the month of this date as a two-digit number.";

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
                lines.Add(new JsonObject { ["instruction"] = Instruction, ["input"] = Long(d), ["output"] = TwoDigits(d.Month) }.ToJsonString());
            }
            return lines;
        }
        var eval = Take(evalCount);
        var train = Take(trainCount);
        File.WriteAllText(Path.Combine(folder, "train.jsonl"), string.Join("\n", train) + "\n");
        File.WriteAllText(Path.Combine(folder, "eval.jsonl"), string.Join("\n", eval) + "\n");
    }
}
