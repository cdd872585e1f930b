namespace QLora.Quant;

/// <summary>
/// Turns every bnb 4-bit weight of a safetensors file back into a dense tensor of its original shape under its
/// original name, dropping the auxiliary tensors and copying everything else; streams one tensor at a time.
/// </summary>
public static class CheckpointDequantizer
{
    /// <summary>What a run did.</summary>
    public sealed record Report(int DequantizedTensors, int CopiedTensors, long OutputBytes);

    /// <summary>
    /// Dequantizes <paramref name="input"/> into <paramref name="output"/> (written atomically). With no
    /// <paramref name="dtype"/>, each weight takes the dtype recorded in its quant state.
    /// </summary>
    public static Report DequantizeFile(string input, string output, FloatType? dtype = null, Action<string>? log = null)
    {
        using var reader = SafetensorsReader.Open(input);
        var metadata = new Dictionary<string, string>(reader.Metadata) { ["format"] = "pt" };
        using var writer = new SafetensorsWriter(output, metadata);
        var plan = new List<(TensorInfo Info, FloatType? OutType)>();
        foreach (var t in reader.Tensors)
        {
            if (BnbCheckpointLayout.IsQuantized(reader, t.Name))
            {
                var fields = BnbCheckpointLayout.ReadFields(reader, t.Name, out _);
                var outType = dtype ?? fields.DType;
                writer.Declare(t.Name, outType.ToTensorDType(), fields.Shape);
                plan.Add((t, outType));
            }
            else if (!BnbCheckpointLayout.IsAuxiliaryKey(t.Name))
            {
                writer.Declare(t.Name, t.DType, t.Shape);
                plan.Add((t, null));
            }
        }
        int deq = 0, copied = 0;
        foreach (var (info, outType) in plan)
        {
            if (outType is not { } ot)
            {
                writer.Write(info.Name, reader.GetSpan(info.Name));
                copied++;
                continue;
            }
            var q = BnbCheckpointLayout.Read(reader, info.Name);
            var buffer = new byte[checked(q.Count * ot.Size())];
            FourBitDequantizer.Dequantize(q, ot, buffer);
            writer.Write(info.Name, buffer);
            deq++;
            log?.Invoke($"dequantized {info.Name} [{string.Join(", ", q.State.Shape)}] -> {ot.Name()}");
        }
        writer.Commit();
        return new Report(deq, copied, new FileInfo(output).Length);
    }
}
