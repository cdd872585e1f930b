using System.Globalization;

namespace QLora.Examples.PretrainTiny;

/// <summary>Dates, names and places the generated texts are made of.</summary>
internal static class Calendar
{
    public static readonly string[] Months =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

    public static readonly string[] Names =
        ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Liam", "Maria", "Noah", "Olga", "Peter"];

    public static readonly string[] Cities =
        ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Prague", "Dublin", "Warsaw", "Athens", "Zurich"];

    /// <summary>A random valid date between 1950 and 2049.</summary>
    public static DateOnly RandomDate(Random rng)
    {
        int year = rng.Next(1950, 2050), month = rng.Next(1, 13);
        return new DateOnly(year, month, rng.Next(1, DateTime.DaysInMonth(year, month) + 1));
    }

    /// <summary>"March 7, 2021".</summary>
    public static string Long(DateOnly d) => $"{Months[d.Month - 1]} {d.Day}, {d.Year}";

    /// <summary>"2021-03-07".</summary>
    public static string Iso(DateOnly d) => d.ToString("yyyy-MM-dd", CultureInfo.InvariantCulture);

    public static string TwoDigits(int n) => n.ToString("D2", CultureInfo.InvariantCulture);
}
