using System.Globalization;

namespace QLora.Quant;

/// <summary>Formats a double as Python's <c>repr</c> (and so <c>json.dumps</c>) does, so files written here match byte for byte.</summary>
public static class PythonFloat
{
    /// <summary>The shortest round-trip decimal, positional unless the exponent is below −4 or above 16 ("1e-05", "0.0001", "1.0").</summary>
    public static string Repr(double value)
    {
        if (double.IsNaN(value)) return "NaN";
        if (double.IsPositiveInfinity(value)) return "Infinity";
        if (double.IsNegativeInfinity(value)) return "-Infinity";
        if (value == 0) return double.IsNegative(value) ? "-0.0" : "0.0";

        // .NET's "R" gives the shortest round-trip digits; take them apart into sign, digits and exponent.
        string shortest = value.ToString("R", CultureInfo.InvariantCulture);
        bool negative = shortest[0] == '-';
        string body = negative ? shortest[1..] : shortest;
        int exp10 = 0;
        int e = body.IndexOfAny(['E', 'e']);
        if (e >= 0)
        {
            exp10 = int.Parse(body[(e + 1)..], NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture);
            body = body[..e];
        }
        int dot = body.IndexOf('.');
        string intPart = dot >= 0 ? body[..dot] : body;
        string fracPart = dot >= 0 ? body[(dot + 1)..] : "";
        string digits = (intPart + fracPart).TrimStart('0');
        int leadingZeros = (intPart + fracPart).Length - digits.Length;
        // value = 0.digits × 10^decpt
        int decpt = intPart.Length - leadingZeros + exp10;
        digits = digits.TrimEnd('0');
        if (digits.Length == 0) digits = "0";

        string text;
        if (decpt <= -4 || decpt > 16)
        {
            string mant = digits.Length == 1 ? digits : digits[0] + "." + digits[1..];
            int exponent = decpt - 1;
            text = mant + "e" + (exponent < 0 ? "-" : "+") + Math.Abs(exponent).ToString("00", CultureInfo.InvariantCulture);
        }
        else if (decpt <= 0)
        {
            text = "0." + new string('0', -decpt) + digits;
        }
        else if (decpt >= digits.Length)
        {
            text = digits + new string('0', decpt - digits.Length) + ".0";
        }
        else
        {
            text = digits[..decpt] + "." + digits[decpt..];
        }
        return negative ? "-" + text : text;
    }
}
