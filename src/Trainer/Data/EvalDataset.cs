using QLora.Quant;
using System.Text;
using System.Text.Json;

namespace QLora.Trainer;

/// <summary>
/// An evaluation file for <c>qlora eval</c>: JSONL whose lines are training samples (text, instruction or chat: eval loss
/// and exact match) or multiple-choice items (<see cref="MultipleChoiceItem"/>), in any mix.
/// </summary>
public static class EvalDataset
{
    /// <summary>
    /// Reads <paramref name="path"/> (strict UTF-8); samples are parsed as <see cref="JsonlDataset.Parse"/> does, with
    /// <paramref name="format"/> for every sample line or null for detection. A malformed line stops the read with a
    /// <see cref="DataFormatException"/> naming the file and line.
    /// </summary>
    public static (IReadOnlyList<TrainingSample> Samples, IReadOnlyList<MultipleChoiceItem> Items) Read(string path, SampleFormat? format)
    {
        InputPaths.RequireFile("the eval data", path, "a JSONL file");
        var samples = new List<TrainingSample>();
        var items = new List<MultipleChoiceItem>();
        int lineNo = 0;
        using var reader = new StreamReader(path, new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true));
        while (true)
        {
            string? line;
            try { line = reader.ReadLine(); }
            catch (DecoderFallbackException) { throw new DataFormatException($"{path}:{lineNo + 1}: not valid UTF-8; the file must be UTF-8 encoded"); }
            if (line is null) break;
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                if (MultipleChoiceItem.IsItem(doc.RootElement)) items.Add(MultipleChoiceItem.Parse(doc.RootElement, lineNo));
                else samples.Add(JsonlDataset.Parse(line, format, lineNo));
            }
            catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException)
            {
                throw new DataFormatException($"{path}:{lineNo}: {e.Message.ReplaceLineEndings(" ")}");
            }
        }
        if (samples.Count == 0 && items.Count == 0) throw new DataFormatException($"{path}: no samples and no multiple-choice items ({lineNo} lines)");
        return (samples, items);
    }
}
