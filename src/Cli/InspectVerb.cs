using System.CommandLine;
using System.Globalization;
using QLora.Quant;
using QLora.Quant.Gguf;

namespace QLora.Cli;

/// <summary><c>qlora inspect</c>: what a safetensors file, model folder or GGUF file holds, with 4-bit weights shown as one row each.</summary>
internal static class InspectVerb
{
    public static Command Create(TextWriter stdout)
    {
        var path = new Argument<string>("path") { Description = "a .safetensors file, a model folder or a .gguf file" };
        var cmd = new Command("inspect", "List tensors: name, dtype, shape, bytes, and for 4-bit weights their quantization.") { path };
        cmd.SetAction(r =>
        {
            var p = r.GetValue(path)!;
            if (!File.Exists(p) && !Directory.Exists(p)) throw new FileNotFoundException($"{p}: no such file or folder");
            if (File.Exists(p) && p.EndsWith(".gguf", StringComparison.OrdinalIgnoreCase))
            {
                using var gguf = GgufReader.Open(p);
                PrintGguf(gguf, stdout);
                return 0;
            }
            using var source = SafetensorsCheckpoint.Open(p);
            Print(source, stdout);
            return 0;
        });
        return cmd;
    }

    private sealed record Row(string Name, string DType, string Shape, long Bytes, long Elements, string Quant);

    internal static void Print(ITensorSource source, TextWriter o)
    {
        var byName = source.Tensors.ToDictionary(t => t.Name);
        var rows = new List<Row>();
        long quantBytes = 0, quantElements = 0, totalBytes = 0, totalElements = 0;
        foreach (var t in source.Tensors.OrderBy(t => t.Name, StringComparer.Ordinal))
        {
            if (BnbCheckpointLayout.IsAuxiliaryKey(t.Name)) continue;
            if (BnbCheckpointLayout.IsQuantized(source, t.Name))
            {
                var f = BnbCheckpointLayout.ReadFields(source, t.Name, out _);
                long bytes = byName.Values.Where(x => x.Name == t.Name || x.Name.StartsWith(t.Name + ".", StringComparison.Ordinal)).Sum(x => x.ByteLength);
                long n = TensorShape.ElementCount(f.Shape);
                var quant = $"{f.QuantType.Name()} bs{f.Blocksize}{(f.NestedOffset is null ? "" : " dq")} from {f.DType.Name()}";
                rows.Add(new Row(t.Name, "4-bit", Shape(f.Shape), bytes, n, quant));
                quantBytes += bytes; quantElements += n;
                totalBytes += bytes; totalElements += n;
            }
            else
            {
                rows.Add(new Row(t.Name, t.DType.ToString(), Shape(t.Shape), t.ByteLength, t.ElementCount, ""));
                totalBytes += t.ByteLength; totalElements += t.ElementCount;
            }
        }
        int w = Math.Max(4, rows.Count == 0 ? 4 : rows.Max(r => r.Name.Length));
        o.WriteLine($"{"name".PadRight(w)}  {"dtype",-6}  {"shape",-16}  {"bytes",14}  quantization");
        foreach (var r in rows)
            o.WriteLine($"{r.Name.PadRight(w)}  {r.DType,-6}  {r.Shape,-16}  {r.Bytes,14:N0}  {r.Quant}");
        o.WriteLine();
        o.WriteLine($"{rows.Count} tensors, {totalElements:N0} parameters, {totalBytes:N0} bytes ({Bits(totalBytes, totalElements)} bits per parameter)");
        if (quantElements > 0)
            o.WriteLine($"4-bit weights: {quantElements:N0} parameters in {quantBytes:N0} bytes = {Bits(quantBytes, quantElements)} bits per weight");
    }

    internal static void PrintGguf(GgufReader g, TextWriter o)
    {
        o.WriteLine($"GGUF v{g.Version}, alignment {g.Alignment}, {g.Metadata.Count} metadata keys, {g.Tensors.Count} tensors");
        foreach (var (key, value) in g.Metadata)
        {
            string text = value.Type == GgufValueType.Array
                ? $"[{((Array)value.Value).Length} × {value.ElementType}]"
                : value.Value is string str ? (str.Length > 80 ? str[..77].ReplaceLineEndings(" ") + "..." : str.ReplaceLineEndings(" ")) : Convert.ToString(value.Value, CultureInfo.InvariantCulture)!;
            o.WriteLine($"  {key} = {text}");
        }
        o.WriteLine();
        int w = Math.Max(4, g.Tensors.Count == 0 ? 4 : g.Tensors.Max(t => t.Name.Length));
        o.WriteLine($"{"name".PadRight(w)}  {"type",-6}  {"shape",-16}  {"bytes",14}");
        long bytes = 0, elements = 0;
        foreach (var t in g.Tensors)
        {
            o.WriteLine($"{t.Name.PadRight(w)}  {t.Type.Name(),-6}  {Shape(t.Shape),-16}  {t.ByteLength,14:N0}");
            bytes += t.ByteLength;
            elements += t.ElementCount;
        }
        o.WriteLine();
        o.WriteLine($"{g.Tensors.Count} tensors, {elements:N0} parameters, {bytes:N0} bytes ({Bits(bytes, elements)} bits per parameter)");
    }

    private static string Shape(long[] shape) => "[" + string.Join(", ", shape) + "]";

    private static string Bits(long bytes, long elements) =>
        elements == 0 ? "-" : (8.0 * bytes / elements).ToString("F3", CultureInfo.InvariantCulture);
}
