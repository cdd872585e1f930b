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
        var drawn = new List<DateOnly>();
        List<string> Take(int n)
        {
            var lines = new List<string>();
            while (lines.Count < n)
            {
                var d = RandomDate(rng);
                if (!seen.Add(d)) continue;
                drawn.Add(d);
                lines.Add(new JsonObject { ["instruction"] = Instruction, ["input"] = Long(d), ["output"] = TwoDigits(d.Month) }.ToJsonString());
            }
            return lines;
        }
        var eval = Take(evalCount);
        var evalDates = drawn.ToList(); // the held-out dates, in eval.jsonl's order
        var train = Take(trainCount);
        File.WriteAllText(Path.Combine(folder, "train.jsonl"), string.Join("\n", train) + "\n");
        File.WriteAllText(Path.Combine(folder, "eval.jsonl"), string.Join("\n", eval) + "\n");
        File.WriteAllText(Path.Combine(folder, "choices.jsonl"), string.Join("\n", Choices(evalDates, seed)) + "\n");
    }

    /// <summary>
    /// The multiple-choice form of the held-out questions: the same prompt (instruction, blank line, date) with four
    /// two-digit months to choose from, the right one among three others drawn without repetition, in random order. Its
    /// own random stream, so train.jsonl and eval.jsonl are the same with or without it.
    /// </summary>
    static List<string> Choices(List<DateOnly> dates, int seed)
    {
        var rng = new Random(seed + 1000);
        var lines = new List<string>();
        foreach (var d in dates)
        {
            var months = new List<int> { d.Month };
            while (months.Count < 4)
            {
                int m = rng.Next(1, 13);
                if (!months.Contains(m)) months.Add(m);
            }
            rng.Shuffle(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(months));
            var choices = new JsonArray([.. months.Select(m => (JsonNode)TwoDigits(m))]);
            lines.Add(new JsonObject { ["question"] = Instruction + "\n\n" + Long(d), ["choices"] = choices, ["answer"] = months.IndexOf(d.Month) }.ToJsonString());
        }
        return lines;
    }
}
