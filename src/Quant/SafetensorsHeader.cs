using System.Text.Json;
using System.Text.Unicode;

namespace QLora.Quant;

/// <summary>
/// Parses and validates the JSON header of a safetensors file without trusting any number in it: every size is
/// checked against the file before it is used, so a malformed header yields a <see cref="SafetensorsFormatException"/>.
/// </summary>
internal static class SafetensorsHeader
{
    /// <summary>Largest header accepted, as in the reference implementation (100 MB).</summary>
    internal const long MaxHeaderBytes = 100_000_000;

    /// <summary>Most dimensions a tensor may have; far above any real model, it only bounds what a header can make us allocate.</summary>
    internal const int MaxRank = 1024;

    /// <summary>The reserved key holding string-to-string metadata.</summary>
    internal const string MetadataKey = "__metadata__";

    /// <summary>
    /// Parses <paramref name="json"/>, the header of a file whose data area starts at absolute offset
    /// <paramref name="dataStart"/> and holds <paramref name="dataLength"/> bytes.
    /// </summary>
    internal static (Dictionary<string, string> Metadata, List<TensorInfo> Tensors) Parse(
        ReadOnlySpan<byte> json, long dataStart, long dataLength, string path)
    {
        if (!Utf8.IsValid(json)) throw Fail(path, "header is not valid UTF-8");
        if (json.Length == 0 || json[0] != (byte)'{') throw Fail(path, "header does not start with '{'");

        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        var tensors = new List<TensorInfo>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        bool sawMetadata = false;
        try
        {
            var reader = new Utf8JsonReader(json, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Disallow, MaxDepth = 64 });
            Expect(ref reader, JsonTokenType.StartObject, path, "header is not a JSON object");
            while (true)
            {
                Next(ref reader, path);
                if (reader.TokenType == JsonTokenType.EndObject) break;
                string name = reader.GetString()!;
                if (name == MetadataKey)
                {
                    if (sawMetadata) throw Fail(path, $"duplicate key '{MetadataKey}'");
                    sawMetadata = true;
                    ReadMetadata(ref reader, metadata, path);
                    continue;
                }
                if (!seen.Add(name)) throw Fail(path, $"duplicate tensor name '{name}'");
                tensors.Add(ReadTensor(ref reader, name, dataStart, dataLength, path));
            }
            if (reader.Read()) throw Fail(path, "header has content after the JSON object");
        }
        catch (JsonException e)
        {
            throw Fail(path, $"header is not valid JSON: {e.Message}", e);
        }
        catch (InvalidOperationException e)
        {
            throw Fail(path, $"header has an invalid string: {e.Message}", e);
        }

        CheckNoOverlap(tensors, path);
        return (metadata, tensors);
    }

    private static void ReadMetadata(ref Utf8JsonReader reader, Dictionary<string, string> metadata, string path)
    {
        Next(ref reader, path);
        if (reader.TokenType == JsonTokenType.Null) return;
        if (reader.TokenType != JsonTokenType.StartObject) throw Fail(path, $"'{MetadataKey}' is not an object");
        while (true)
        {
            Next(ref reader, path);
            if (reader.TokenType == JsonTokenType.EndObject) return;
            string key = reader.GetString()!;
            Next(ref reader, path);
            if (reader.TokenType != JsonTokenType.String) throw Fail(path, $"'{MetadataKey}' value of '{key}' is not a string");
            if (!metadata.TryAdd(key, reader.GetString()!)) throw Fail(path, $"duplicate '{MetadataKey}' key '{key}'");
        }
    }

    private static TensorInfo ReadTensor(ref Utf8JsonReader reader, string name, long dataStart, long dataLength, string path)
    {
        Next(ref reader, path);
        if (reader.TokenType != JsonTokenType.StartObject) throw Fail(path, $"tensor '{name}': entry is not an object");
        TensorDType? dtype = null;
        long[]? shape = null;
        long[]? offsets = null;
        while (true)
        {
            Next(ref reader, path);
            if (reader.TokenType == JsonTokenType.EndObject) break;
            string key = reader.GetString()!;
            switch (key)
            {
                case "dtype":
                    if (dtype is not null) throw Fail(path, $"tensor '{name}': duplicate key 'dtype'");
                    Next(ref reader, path);
                    if (reader.TokenType != JsonTokenType.String) throw Fail(path, $"tensor '{name}': dtype is not a string");
                    string text = reader.GetString()!;
                    if (!TensorDTypes.TryParse(text, out var parsed)) throw Fail(path, $"tensor '{name}': unknown dtype '{text}'");
                    dtype = parsed;
                    break;
                case "shape":
                    if (shape is not null) throw Fail(path, $"tensor '{name}': duplicate key 'shape'");
                    shape = ReadIntegers(ref reader, name, "shape", MaxRank, path);
                    break;
                case "data_offsets":
                    if (offsets is not null) throw Fail(path, $"tensor '{name}': duplicate key 'data_offsets'");
                    offsets = ReadIntegers(ref reader, name, "data_offsets", 2, path);
                    if (offsets.Length != 2) throw Fail(path, $"tensor '{name}': data_offsets must hold exactly 2 integers");
                    break;
                default:
                    reader.Skip();
                    break;
            }
        }
        if (dtype is null) throw Fail(path, $"tensor '{name}': missing dtype");
        if (shape is null) throw Fail(path, $"tensor '{name}': missing shape");
        if (offsets is null) throw Fail(path, $"tensor '{name}': missing data_offsets");

        long begin = offsets[0], end = offsets[1];
        if (begin > end) throw Fail(path, $"tensor '{name}': data_offsets begin {begin} is after end {end}");
        if (end > dataLength) throw Fail(path, $"tensor '{name}': data_offsets end {end} is past the {dataLength}-byte data area");
        long bytes;
        try
        {
            long count = 1;
            foreach (long d in shape) count = checked(count * d);
            bytes = checked(count * dtype.Value.Size());
        }
        catch (OverflowException)
        {
            throw Fail(path, $"tensor '{name}': shape [{string.Join(", ", shape)}] is too large");
        }
        if (bytes != end - begin)
            throw Fail(path, $"tensor '{name}': shape [{string.Join(", ", shape)}] of {dtype} needs {bytes} bytes but data_offsets [{begin}, {end}] span {end - begin}");
        return new TensorInfo(name, dtype.Value, shape, dataStart + begin, bytes);
    }

    private static long[] ReadIntegers(ref Utf8JsonReader reader, string name, string what, int max, string path)
    {
        Next(ref reader, path);
        if (reader.TokenType != JsonTokenType.StartArray) throw Fail(path, $"tensor '{name}': {what} is not an array");
        var values = new List<long>();
        while (true)
        {
            Next(ref reader, path);
            if (reader.TokenType == JsonTokenType.EndArray) return values.ToArray();
            if (values.Count == max) throw Fail(path, $"tensor '{name}': {what} has more than {max} entries");
            if (reader.TokenType != JsonTokenType.Number || !reader.TryGetUInt64(out ulong v) || v > long.MaxValue)
                throw Fail(path, $"tensor '{name}': {what} must hold non-negative integers");
            values.Add((long)v);
        }
    }

    private static void CheckNoOverlap(List<TensorInfo> tensors, string path)
    {
        var ranges = tensors.Where(t => t.ByteLength > 0).OrderBy(t => t.DataOffset).ToList();
        for (int i = 1; i < ranges.Count; i++)
        {
            var prev = ranges[i - 1];
            if (ranges[i].DataOffset < prev.DataOffset + prev.ByteLength)
                throw Fail(path, $"tensors '{prev.Name}' and '{ranges[i].Name}' overlap");
        }
    }

    private static void Next(ref Utf8JsonReader reader, string path)
    {
        if (!reader.Read()) throw Fail(path, "header JSON ends early");
    }

    private static void Expect(ref Utf8JsonReader reader, JsonTokenType type, string path, string problem)
    {
        Next(ref reader, path);
        if (reader.TokenType != type) throw Fail(path, problem);
    }

    private static SafetensorsFormatException Fail(string path, string problem, Exception? inner = null) => new(path, problem, inner);
}
