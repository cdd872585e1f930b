using System.Text.Json;

namespace QLora.Cli;

/// <summary>The one-line JSON summaries verbs end with, so scripts can read their figures.</summary>
internal static class Json
{
    private static readonly JsonSerializerOptions Options = new() { WriteIndented = false };

    /// <summary>Serialises an anonymous object on one line.</summary>
    public static string Line(object value) => JsonSerializer.Serialize(value, Options);
}
