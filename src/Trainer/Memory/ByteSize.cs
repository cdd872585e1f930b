using System.Globalization;
using System.Text.RegularExpressions;

namespace QLora.Trainer;

/// <summary>Byte counts written the way people write them: <c>24GB</c> (10⁹), <c>24GiB</c> (2³⁰), <c>8000MB</c>, <c>512KiB</c>, raw bytes.</summary>
public static partial class ByteSize
{
    [GeneratedRegex(@"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", RegexOptions.IgnoreCase)]
    private static partial Regex Pattern();

    /// <summary>Parses a size; throws <see cref="FormatException"/> saying what is accepted.</summary>
    public static long Parse(string text)
    {
        var m = Pattern().Match(text ?? "");
        if (!m.Success)
            throw new FormatException($"'{text}' is not a size: write bytes or a number with a unit (KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024), e.g. 24GB");
        double value = double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture);
        string unit = m.Groups[2].Success ? m.Groups[2].Value.ToUpperInvariant() : "B";
        double scale = unit switch
        {
            "B" => 1,
            "KB" => 1e3, "MB" => 1e6, "GB" => 1e9, "TB" => 1e12,
            "KIB" => 1L << 10, "MIB" => 1L << 20, "GIB" => 1L << 30, "TIB" => 1L << 40,
            _ => throw new FormatException($"'{text}': unknown unit {unit}"),
        };
        double bytes = Math.Round(value * scale);
        if (bytes <= 0 || bytes > long.MaxValue / 2) throw new FormatException($"'{text}': the size must be positive and below 4 EiB");
        return (long)bytes;
    }

    /// <summary>As <see cref="Parse"/>, without throwing.</summary>
    public static bool TryParse(string? text, out long bytes)
    {
        bytes = 0;
        if (string.IsNullOrWhiteSpace(text)) return false;
        try
        {
            bytes = Parse(text);
            return true;
        }
        catch (FormatException)
        {
            return false;
        }
    }

    /// <summary>A readable form: GiB/MiB/KiB with two decimals.</summary>
    public static string Format(long bytes) => Math.Abs(bytes) switch
    {
        >= 1L << 30 => (bytes / (double)(1L << 30)).ToString("F2", CultureInfo.InvariantCulture) + " GiB",
        >= 1L << 20 => (bytes / (double)(1L << 20)).ToString("F1", CultureInfo.InvariantCulture) + " MiB",
        >= 1L << 10 => (bytes / (double)(1L << 10)).ToString("F1", CultureInfo.InvariantCulture) + " KiB",
        _ => bytes.ToString(CultureInfo.InvariantCulture) + " B",
    };
}
