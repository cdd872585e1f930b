using System.Text;

namespace QLora.Quant.Tests;

/// Byte strings from the reference implementation's own test suite (huggingface/safetensors, bindings/python/tests/test_simple.py).
public sealed class SafetensorsReferenceBytesTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    private const string Json = """{"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}""";

    /// save({"test": np.zeros((2, 2), dtype=np.int32)}) with data[1, 1] = 1, as the current reference writes it:
    /// header length 64 ('@'), the JSON padded with 4 spaces to a multiple of 8, then 16 data bytes.
    private static byte[] Reference(bool lastIsOne)
    {
        byte[] data = new byte[16];
        if (lastIsOne) data[12] = 1;
        return [(byte)'@', 0, 0, 0, 0, 0, 0, 0, .. Encoding.ASCII.GetBytes(Json + "    "), .. data];
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void WriterProducesTheReferenceBytes(bool lastIsOne)
    {
        string path = _dir.File("ref.safetensors");
        var data = new int[] { 0, 0, 0, lastIsOne ? 1 : 0 };
        SafetensorsWriter.WriteFile(path, [("test", TensorDType.I32, [2, 2], System.Runtime.InteropServices.MemoryMarshal.AsBytes(data.AsSpan()).ToArray())]);
        Assert.Equal(Reference(lastIsOne), File.ReadAllBytes(path));
    }

    [Fact]
    public void ReaderReadsTheReferenceBytesAndTheOlderUnpaddedForm()
    {
        string padded = _dir.File("padded.safetensors");
        File.WriteAllBytes(padded, Reference(true));
        using (var r = SafetensorsReader.Open(padded))
        {
            Assert.Equal([0, 0, 0, 1], r.Read<int>("test"));
            Assert.Equal([2L, 2L], r.GetInfo("test").Shape);
        }

        // Earlier releases wrote no padding: '<' (60) and the data right after the JSON.
        string unpadded = _dir.File("unpadded.safetensors");
        File.WriteAllBytes(unpadded, [(byte)'<', 0, 0, 0, 0, 0, 0, 0, .. Encoding.ASCII.GetBytes(Json), .. new byte[16]]);
        using (var r = SafetensorsReader.Open(unpadded))
            Assert.Equal([0, 0, 0, 0], r.Read<int>("test"));

        // With metadata, header length 102 ('f'), as in the same suite.
        string withMetadata = _dir.File("meta.safetensors");
        File.WriteAllBytes(withMetadata, [(byte)'f', 0, 0, 0, 0, 0, 0, 0,
            .. Encoding.ASCII.GetBytes("""{"__metadata__":{"framework":"pt"},"test1":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}       """), .. new byte[16]]);
        using (var r = SafetensorsReader.Open(withMetadata))
        {
            Assert.Equal("pt", r.Metadata["framework"]);
            Assert.Equal([0, 0, 0, 0], r.Read<int>("test1"));
        }
    }
}
