using System.Globalization;

namespace QLora.Trainer;

/// <summary>Sizes written by people ("24GB", "8 GiB", "512MB", "1e9") as bytes, and bytes as short text.</summary>
public static class ByteSize
{
    /// <summary>Parses a size: a number with an optional unit B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024).</summary>
    public static long Parse(string text) =>
        TryParse(text, out var b) ? b : throw new FormatException($"'{text}' is not a size (examples: 24GB, 8GiB, 6000MB, 1073741824)");

    /// <summary>As <see cref="Parse"/>, without throwing.</summary>
    public static bool TryParse(string? text, out long bytes)
    {
        bytes = 0;
        if (string.IsNullOrWhiteSpace(text)) return false;
        var s = text.Trim();
        int i = 0;
        while (i < s.Length && (char.IsDigit(s[i]) || s[i] is '.' or 'e' or 'E' or '+' or '-')) i++;
        if (!double.TryParse(s[..i], NumberStyles.Float, CultureInfo.InvariantCulture, out var n) || n < 0 || !double.IsFinite(n)) return false;
        double scale = s[i..].Trim().ToUpperInvariant() switch
        {
            "" or "B" => 1,
            "K" or "KB" => 1e3, "M" or "MB" => 1e6, "G" or "GB" => 1e9, "T" or "TB" => 1e12,
            "KIB" => 1L << 10, "MIB" => 1L << 20, "GIB" => 1L << 30, "TIB" => 1L << 40,
            _ => double.NaN,
        };
        if (double.IsNaN(scale) || n * scale > long.MaxValue) return false;
        bytes = (long)Math.Round(n * scale);
        return true;
    }

    /// <summary>Bytes as "7.41 GB" (decimal units).</summary>
    public static string Format(long bytes) => bytes switch
    {
        >= 1_000_000_000 => (bytes / 1e9).ToString("F2", CultureInfo.InvariantCulture) + " GB",
        >= 1_000_000 => (bytes / 1e6).ToString("F1", CultureInfo.InvariantCulture) + " MB",
        >= 1_000 => (bytes / 1e3).ToString("F1", CultureInfo.InvariantCulture) + " KB",
        _ => bytes.ToString(CultureInfo.InvariantCulture) + " B",
    };
}
