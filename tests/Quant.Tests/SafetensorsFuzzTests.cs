using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;
using Xunit.Abstractions;

namespace QLora.Quant.Tests;

/// Random mutations of a valid file: each must either throw SafetensorsFormatException from Open or read every tensor.
public sealed class SafetensorsFuzzTests(ITestOutputHelper output) : IDisposable
{
    private const int Iterations = 4000;
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    private byte[] ValidFile()
    {
        var random = new Random(99);
        string path = _dir.File("base.safetensors");
        var tensors = new List<(string, TensorDType, long[], byte[])>();
        var dtypes = Enum.GetValues<TensorDType>();
        for (int i = 0; i < 9; i++)
        {
            var dtype = dtypes[(i * 5) % dtypes.Length];
            long[] shape = i switch { 0 => [], 1 => [0, 3], _ => [i % 3 + 1, i] };
            var data = new byte[shape.Aggregate(1L, (a, b) => a * b) * dtype.Size()];
            random.NextBytes(data);
            tensors.Add(($"model.layers.{i}.w", dtype, shape, data));
        }
        SafetensorsWriter.WriteFile(path, tensors, new Dictionary<string, string> { ["format"] = "pt" });
        return File.ReadAllBytes(path);
    }

    private static readonly string[] JsonFragments =
        ["{", "}", "[", "]", ",", ":", "\"", "-", "0", "1", "9", "e", ".", " ", "null", "\\u0000", "\\ud800", "\\", "18446744073709551616", "F32", "X", "\u00e9"];

    private static readonly string[] DTypeNames = [.. Enum.GetNames<TensorDType>(), "F128", "f32", "", "BOOL ", "U8\u0000"];

    private static byte[] Mutate(byte[] original, Random random)
    {
        var file = (byte[])original.Clone();
        int headerLength = (int)BinaryPrimitives.ReadUInt64LittleEndian(file);
        switch (random.Next(8))
        {
            case 0: // flip bits anywhere
                for (int i = random.Next(1, 5); i > 0; i--) file[random.Next(file.Length)] ^= (byte)(1 << random.Next(8));
                return file;
            case 1: // random bytes inside the header
                for (int i = random.Next(1, 4); i > 0; i--) file[8 + random.Next(headerLength)] = (byte)random.Next(256);
                return file;
            case 2: // truncate
                return file[..random.Next(file.Length)];
            case 3: // extend with junk
                return [.. file, .. Enumerable.Range(0, random.Next(1, 40)).Select(_ => (byte)random.Next(256))];
            case 4: // header length edits
            {
                ulong value = random.Next(5) switch
                {
                    0 => (ulong)(headerLength + random.Next(-16, 17)),
                    1 => (ulong)random.NextInt64(),
                    2 => 1UL << random.Next(64),
                    3 => ulong.MaxValue - (ulong)random.Next(100),
                    _ => (ulong)random.Next(file.Length + 1),
                };
                BinaryPrimitives.WriteUInt64LittleEndian(file, value);
                return file;
            }
            default: // textual JSON edits, header length kept consistent (sometimes not)
            {
                string json = Encoding.UTF8.GetString(file, 8, headerLength);
                byte[] data = file[(8 + headerLength)..];
                json = EditJson(json, random);
                byte[] header = Encoding.UTF8.GetBytes(json);
                ulong length = random.Next(10) == 0 ? (ulong)random.Next(header.Length + 8) : (ulong)header.Length;
                return RawSafetensors.Build(header, data, length);
            }
        }
    }

    private static string EditJson(string json, Random random)
    {
        int count = random.Next(1, 3);
        for (int i = 0; i < count; i++)
        {
            int at = random.Next(json.Length);
            switch (random.Next(8))
            {
                case 0: json = json.Remove(at, 1); break;
                case 1: json = json.Insert(at, JsonFragments[random.Next(JsonFragments.Length)]); break;
                case 2: // change one digit
                {
                    var digits = Enumerable.Range(0, json.Length).Where(k => char.IsAsciiDigit(json[k])).ToList();
                    int k = digits[random.Next(digits.Count)];
                    json = json[..k] + (char)('0' + random.Next(10)) + json[(k + 1)..];
                    break;
                }
                case 3: // replace a number with another number
                {
                    var m = System.Text.RegularExpressions.Regex.Matches(json, "[0-9]+");
                    var pick = m[random.Next(m.Count)];
                    string replacement = random.Next(4) switch
                    {
                        0 => random.Next(200).ToString(),
                        1 => random.NextInt64().ToString(),
                        2 => "-" + random.Next(10),
                        _ => "9223372036854775807",
                    };
                    json = json[..pick.Index] + replacement + json[(pick.Index + pick.Length)..];
                    break;
                }
                case 4: // swap a dtype
                {
                    var m = System.Text.RegularExpressions.Regex.Matches(json, "\"dtype\":\"([A-Z0-9_]+)\"");
                    if (m.Count == 0) goto case 0;
                    var g = m[random.Next(m.Count)].Groups[1];
                    json = json[..g.Index] + DTypeNames[random.Next(DTypeNames.Length)] + json[(g.Index + g.Length)..];
                    break;
                }
                case 5: // rename a tensor to another one's name (duplicate) or to the metadata key
                {
                    var m = System.Text.RegularExpressions.Regex.Matches(json, "\"(model\\.layers\\.[0-9]\\.w)\"");
                    if (m.Count == 0) goto case 0;
                    var g = m[random.Next(m.Count)].Groups[1];
                    string name = random.Next(4) == 0 ? "__metadata__" : m[random.Next(m.Count)].Groups[1].Value;
                    json = json[..g.Index] + name + json[(g.Index + g.Length)..];
                    break;
                }
                case 7: // point an index entry at another shard, a missing file or outside the folder
                {
                    var m = System.Text.RegularExpressions.Regex.Matches(json, "\"([^\"]*\\.safetensors)\"");
                    if (m.Count == 0) goto case 0;
                    var g = m[random.Next(m.Count)].Groups[1];
                    string[] others = ["missing.safetensors", "../model-00001-of-00003.safetensors", "model.safetensors.index.json", ".", m[random.Next(m.Count)].Groups[1].Value];
                    json = json[..g.Index] + others[random.Next(others.Length)] + json[(g.Index + g.Length)..];
                    break;
                }
                default: // swap two characters
                {
                    int b = random.Next(json.Length);
                    var chars = json.ToCharArray();
                    (chars[at], chars[b]) = (chars[b], chars[at]);
                    json = new string(chars);
                    break;
                }
            }
            if (json.Length == 0) break;
        }
        return json;
    }

    [Fact]
    public void MutatedFilesThrowFormatExceptionOrReadCleanly()
    {
        byte[] original = ValidFile();
        var random = new Random(20261126);
        string path = _dir.File("mutant.safetensors");
        int valid = 0, rejected = 0;
        for (int iteration = 0; iteration < Iterations; iteration++)
        {
            byte[] mutant = Mutate(original, random);
            File.WriteAllBytes(path, mutant);
            SafetensorsReader reader;
            try
            {
                reader = SafetensorsReader.Open(path);
            }
            catch (SafetensorsFormatException e)
            {
                Assert.Equal(path, e.FilePath);
                rejected++;
                continue;
            }
            catch (Exception e)
            {
                Assert.Fail($"iteration {iteration}: {e.GetType().Name} escaped: {e}\nfile: {Convert.ToBase64String(mutant)}");
                throw;
            }
            using (reader)
            {
                ReadEverything(reader, mutant);
            }
            valid++;
        }
        output.WriteLine($"{Iterations} mutants: {rejected} rejected, {valid} valid and fully read");
        Assert.True(valid > 100, $"only {valid} mutants were valid");
        Assert.True(rejected > Iterations / 2, $"only {rejected} mutants were rejected");
    }

    private static void ReadEverything(SafetensorsReader reader, byte[] file)
    {
        foreach (var t in reader.Tensors)
        {
            Assert.Same(t, reader.GetInfo(t.Name));
            Assert.InRange(t.DataOffset, reader.DataStart, file.Length);
            Assert.InRange(t.DataOffset + t.ByteLength, t.DataOffset, file.Length);
            byte[] expected = file[(int)t.DataOffset..(int)(t.DataOffset + t.ByteLength)];
            Assert.Equal(expected, reader.ReadBytes(t.Name));
            Assert.Equal(expected, reader.GetSpan(t.Name).ToArray());
            var into = new byte[t.ByteLength];
            reader.ReadInto(t.Name, into);
            Assert.Equal(expected, into);
            byte[] typed = t.DType.Size() switch
            {
                1 => reader.Read<byte>(t.Name),
                2 => MemoryMarshal.AsBytes(reader.Read<short>(t.Name).AsSpan()).ToArray(),
                4 => MemoryMarshal.AsBytes(reader.Read<float>(t.Name).AsSpan()).ToArray(),
                _ => MemoryMarshal.AsBytes(reader.Read<long>(t.Name).AsSpan()).ToArray(),
            };
            Assert.Equal(expected, typed);
        }
    }

    [Fact]
    public void MutatedIndexFilesThrowFormatExceptionOrOpenCleanly()
    {
        var random = new Random(7);
        var tensors = Enumerable.Range(0, 6).Select(i => ($"layer.{i}", TensorDType.F32, new long[] { 4 }, new byte[16])).ToList();
        string folder = System.IO.Path.Combine(_dir.Path, "ckpt");
        ShardedSafetensorsWriter.WriteCheckpoint(folder, tensors, maxShardBytes: 32);
        string indexPath = System.IO.Path.Combine(folder, "model.safetensors.index.json");
        string original = File.ReadAllText(indexPath);
        int valid = 0;
        for (int iteration = 0; iteration < 600; iteration++)
        {
            File.WriteAllText(indexPath, EditJson(original, random));
            try
            {
                using var checkpoint = SafetensorsCheckpoint.Open(folder);
                foreach (var t in checkpoint.Tensors) Assert.Equal(16, checkpoint.ReadBytes(t.Name).Length);
                valid++;
            }
            catch (SafetensorsFormatException e)
            {
                Assert.Contains("ckpt", e.FilePath);
            }
            catch (Exception e)
            {
                Assert.Fail($"iteration {iteration}: {e.GetType().Name} escaped: {e}\nindex: {File.ReadAllText(indexPath)}");
            }
        }
        output.WriteLine($"600 index mutants: {valid} valid");
        Assert.True(valid > 10);
    }
}
