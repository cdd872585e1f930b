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
    /// Reads <paramref name="path"/> (strict UTF-8); samples are parsed as <see cref="JsonlDataset.Read"/> does (lines bounded as there), with
    /// <paramref name="format"/> for every sample line or null for detection. A malformed line stops the read with a
    /// <see cref="DataFormatException"/> naming the file and line.
    /// </summary>
    public static (IReadOnlyList<TrainingSample> Samples, IReadOnlyList<MultipleChoiceItem> Items) Read(string path, SampleFormat? format)
    {
        InputPaths.RequireFile("the eval data", path, "a JSONL file");
        var samples = new List<TrainingSample>();
        var items = new List<MultipleChoiceItem>();
        int lineNo = JsonlDataset.ForEachLine(path, JsonlDataset.DefaultMaxLineBytes, (line, n) =>
        {
            using var doc = JsonDocument.Parse(line);
            if (MultipleChoiceItem.IsItem(doc.RootElement)) items.Add(MultipleChoiceItem.Parse(doc.RootElement, n));
            else samples.Add(JsonlDataset.Parse(doc.RootElement, format, n));
        }, message => throw new DataFormatException(message));
        if (samples.Count == 0 && items.Count == 0) throw new DataFormatException($"{path}: no samples and no multiple-choice items ({lineNo} lines)");
        return (samples, items);
    }
}
