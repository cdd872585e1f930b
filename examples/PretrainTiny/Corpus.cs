using System.Text;
using static QLora.Examples.PretrainTiny.Calendar;

namespace QLora.Examples.PretrainTiny;

/// <summary>
/// The pretraining corpus: short English-like documents about people, places and dates, written in the long form
/// ("March 7, 2021") and the ISO form ("2021-03-07") in different sentences, plus plain facts ("March is month 03",
/// "Day 7 is written 07") and the parts of a long-form date ("In March 7, 2021, the year is 2021"). It teaches the
/// pieces of the fine-tuning task but never the task itself: no sentence writes one date in both forms, and the
/// [INST] prompt format never appears.
/// </summary>
internal static class Corpus
{
    public static string Sentence(Random rng)
    {
        string name = Names[rng.Next(Names.Length)], city = Cities[rng.Next(Cities.Length)];
        var d = RandomDate(rng);
        int month = rng.Next(1, 13), day = rng.Next(1, 32);
        return rng.Next(13) switch
        {
            10 => $"In {Long(d)}, the year is {d.Year}.",
            11 => $"In {Long(d)}, the day is {TwoDigits(d.Day)}.",
            12 => $"In {Long(d)}, the month is {TwoDigits(d.Month)}.",
            0 => $"{name} was born on {Long(d)}.",
            1 => $"The report from {city} is dated {Iso(d)}.",
            2 => $"{Months[month - 1]} is month {TwoDigits(month)} of the year.",
            3 => $"Day {day} is written as {TwoDigits(day)}.",
            4 => $"On {Long(d)}, {name} visited {city}.",
            5 => $"Deadline: {Iso(d)}. Owner: {name}.",
            6 => $"In {d.Year} the {Months[d.Month - 1]} meeting was held in {city}.",
            7 => $"The code {Iso(d)} was read back as {Iso(d)}.",
            8 => $"{name} wrote {Long(d)} on the letter and {name} signed it.",
            _ => $"Month {TwoDigits(month)} comes after month {TwoDigits(month == 1 ? 12 : month - 1)}.",
        };
    }

    /// <summary>A document of 3–8 sentences.</summary>
    public static string Document(Random rng)
    {
        var sb = new StringBuilder();
        int n = rng.Next(3, 9);
        for (int i = 0; i < n; i++)
        {
            if (i > 0) sb.Append(' ');
            sb.Append(Sentence(rng));
        }
        return sb.ToString();
    }
}
