namespace QLora.Trainer;

/// <summary>
/// Packs encoded samples into rows of at most <c>rowLength</c> tokens, first fit in the given order, never splitting a
/// sample. Within a row each sample keeps its own positions (0, 1, …) and segment, and the first token of every sample
/// after the first gets label −100, so nothing is predicted across a sample boundary: a packed row's loss equals the
/// sum of its samples' losses computed one by one.
/// </summary>
public static class SequencePacker
{
    /// <summary>Packs <paramref name="samples"/> (each at most <paramref name="rowLength"/> tokens) into rows.</summary>
    public static List<TokenRow> Pack(IEnumerable<EncodedSample> samples, int rowLength)
    {
        var rows = new List<TokenRow>();
        var ids = new List<int>(rowLength);
        var labels = new List<int>(rowLength);
        var positions = new List<int>(rowLength);
        var segments = new List<int>(rowLength);
        int segment = 0;
        void Flush()
        {
            if (ids.Count == 0) return;
            rows.Add(new TokenRow([.. ids], [.. labels], [.. positions], [.. segments]));
            ids.Clear(); labels.Clear(); positions.Clear(); segments.Clear();
            segment = 0;
        }
        foreach (var s in samples)
        {
            if (s.InputIds.Length > rowLength) throw new ArgumentException($"a sample of {s.InputIds.Length} tokens does not fit a row of {rowLength}; truncate first");
            if (s.InputIds.Length == 0) continue;
            if (ids.Count + s.InputIds.Length > rowLength) Flush();
            for (int i = 0; i < s.InputIds.Length; i++)
            {
                ids.Add(s.InputIds[i]);
                labels.Add(i == 0 && segment > 0 ? EncodedSample.CausalLmLossIgnore : s.Labels[i]);
                positions.Add(i);
                segments.Add(segment);
            }
            segment++;
        }
        Flush();
        return rows;
    }
}
