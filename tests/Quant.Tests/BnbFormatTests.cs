using System.Text;
using System.Text.Json.Nodes;

namespace QLora.Quant.Tests;

public class BnbFormatTests
{
    [Theory]
    [InlineData(0.031807661056518555, "0.031807661056518555")]
    [InlineData(1e-05, "1e-05")]
    [InlineData(0.0001, "0.0001")]
    [InlineData(1.0, "1.0")]
    [InlineData(100.0, "100.0")]
    [InlineData(1e16, "1e+16")]
    [InlineData(1e15, "1000000000000000.0")]
    [InlineData(123456789.125, "123456789.125")]
    [InlineData(1.5e-7, "1.5e-07")]
    [InlineData(-2.5, "-2.5")]
    [InlineData(0.1, "0.1")]
    [InlineData(0.10000000149011612, "0.10000000149011612")]
    [InlineData(1.7976931348623157e308, "1.7976931348623157e+308")]
    [InlineData(5e-324, "5e-324")]
    [InlineData(0.0, "0.0")]
    [InlineData(-0.00012345, "-0.00012345")]
    public void FloatsPrintAsPythonRepr(double value, string expected) => Assert.Equal(expected, PythonFloat.Repr(value));

    [Fact]
    public void QuantStateJsonIsByteIdenticalToJsonDumps()
    {
        var x = TestData.Randn(4096 * 2, seed: 2);
        var q = FourBitQuantizer.Quantize(x, [2, 4096], QuantType.Nf4, 64, doubleQuant: true);
        string json = BnbQuantStateJson.Serialize(q.State);
        string offset = PythonFloat.Repr(q.State.Nested!.Offset);
        Assert.Equal("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2, 4096], " +
                     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": " + offset + "}", json);

        var plain = FourBitQuantizer.Quantize(x, [8192], QuantType.Fp4, 128, doubleQuant: false);
        Assert.Equal("{\"quant_type\": \"fp4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": [8192]}",
            BnbQuantStateJson.Serialize(plain.State));
    }

    [Fact]
    public void QuantStateJsonIsReadInAnyOrderAndWhitespace()
    {
        var f = BnbQuantStateJson.Parse(Encoding.UTF8.GetBytes(
            "{ \"nested_offset\":0.5,\"shape\":[ 3 ,4 ],\n\"dtype\":\"bfloat16\",\"blocksize\":128,\"quant_type\":\"nf4\",\"nested_blocksize\":256,\"nested_dtype\":\"float32\"}"));
        Assert.Equal(QuantType.Nf4, f.QuantType);
        Assert.Equal(128, f.Blocksize);
        Assert.Equal(FloatType.BFloat16, f.DType);
        Assert.Equal(new long[] { 3, 4 }, f.Shape);
        Assert.Equal(0.5f, f.NestedOffset);
        Assert.Throws<FormatException>(() => BnbQuantStateJson.Parse(Encoding.UTF8.GetBytes("{\"quant_type\": \"nf4\"}")));
        Assert.Throws<FormatException>(() => BnbQuantStateJson.Parse(Encoding.UTF8.GetBytes("{not json")));
        Assert.Throws<FormatException>(() => BnbQuantStateJson.Parse(Encoding.UTF8.GetBytes(
            "{\"quant_type\": \"int4\", \"blocksize\": 64, \"dtype\": \"float16\", \"shape\": [2]}")));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void EntriesHaveTheKeysDtypesAndShapesOfTheSpec(bool doubleQuant)
    {
        // Llama-style q_proj of 64 x 96 = 6144 elements, blocksize 64 -> 96 blocks.
        var q = FourBitQuantizer.Quantize(TestData.Randn(6144, 4), [64, 96], QuantType.Nf4, 64, doubleQuant);
        var entries = BnbCheckpointLayout.ToEntries("model.layers.0.self_attn.q_proj.weight", q).ToDictionary(e => e.Name);
        const string P = "model.layers.0.self_attn.q_proj.weight";
        Assert.Equal(TensorDType.U8, entries[P].DType);
        Assert.Equal(new long[] { 3072, 1 }, entries[P].Shape);
        Assert.Equal(doubleQuant ? TensorDType.U8 : TensorDType.F32, entries[P + ".absmax"].DType);
        Assert.Equal(new long[] { 96 }, entries[P + ".absmax"].Shape);
        Assert.Equal(TensorDType.F32, entries[P + ".quant_map"].DType);
        Assert.Equal(new long[] { 16 }, entries[P + ".quant_map"].Shape);
        Assert.True(entries.ContainsKey(P + ".quant_state.bitsandbytes__nf4"));
        Assert.Equal(doubleQuant, entries.ContainsKey(P + ".nested_absmax"));
        Assert.Equal(doubleQuant, entries.ContainsKey(P + ".nested_quant_map"));
        Assert.Equal(doubleQuant ? 6 : 4, entries.Count);
        if (doubleQuant)
        {
            Assert.Equal(new long[] { 1 }, entries[P + ".nested_absmax"].Shape);
            Assert.Equal(new long[] { 256 }, entries[P + ".nested_quant_map"].Shape);
        }
        // Every entry's byte count matches dtype x shape.
        foreach (var e in entries.Values) Assert.Equal(e.Data.LongLength, e.Shape.Aggregate(1L, (a, d) => a * d) * e.DType.Size());
    }

    [Theory]
    [InlineData(QuantType.Nf4, 64, true)]
    [InlineData(QuantType.Fp4, 256, false)]
    [InlineData(QuantType.Nf4, 4096, true)]
    public void EntriesReadBackIntoTheSameTensor(QuantType type, int blocksize, bool doubleQuant)
    {
        var q = FourBitQuantizer.Quantize(TestData.Randn(10_001, 6), [10_001], type, blocksize, doubleQuant);
        var source = new InMemoryTensors(BnbCheckpointLayout.ToEntries("w.weight", q));
        Assert.True(BnbCheckpointLayout.IsQuantized(source, "w.weight"));
        var back = BnbCheckpointLayout.Read(source, "w.weight");
        Assert.Equal(q.Packed, back.Packed);
        Assert.Equal(q.State.DecodeAbsmax(), back.State.DecodeAbsmax());
        Assert.Equal((q.State.QuantType, q.State.Blocksize, q.State.DType), (back.State.QuantType, back.State.Blocksize, back.State.DType));
        Assert.Equal(q.State.Shape, back.State.Shape);
        Assert.Equal(doubleQuant, back.State.Nested is not null);
    }

    [Fact]
    public void PackedCodesStoredAsAnotherQuantStorageDtypeAreReinterpreted()
    {
        var q = FourBitQuantizer.Quantize(TestData.Randn(4096, 8), [64, 64], QuantType.Nf4, 64, doubleQuant: true);
        var entries = BnbCheckpointLayout.ToEntries("w.weight", q)
            .Select(e => e.Name == "w.weight" ? e with { DType = TensorDType.BF16, Shape = [e.Data.Length / 2, 1] } : e);
        var back = BnbCheckpointLayout.Read(new InMemoryTensors(entries), "w.weight");
        Assert.Equal(q.Packed, back.Packed);
    }

    [Fact]
    public void MissingOrInconsistentPartsAreFormatErrorsNamingTheKey()
    {
        var q = FourBitQuantizer.Quantize(TestData.Randn(4096, 8), [64, 64], QuantType.Nf4, 64, doubleQuant: true);
        var all = BnbCheckpointLayout.ToEntries("w.weight", q);
        var noNested = new InMemoryTensors(all.Where(e => !e.Name.EndsWith(".nested_absmax")));
        Assert.Contains("w.weight.nested_absmax", Assert.Throws<FormatException>(() => BnbCheckpointLayout.Read(noNested, "w.weight")).Message);
        var shortPacked = new InMemoryTensors(all.Select(e => e.Name == "w.weight" ? e with { Data = new byte[100], Shape = [100, 1] } : e));
        Assert.Contains("w.weight", Assert.Throws<FormatException>(() => BnbCheckpointLayout.Read(shortPacked, "w.weight")).Message);
        Assert.Throws<FormatException>(() => BnbCheckpointLayout.Read(new InMemoryTensors([]), "w.weight"));
    }

    [Fact]
    public void QuantizationConfigHasTheTransformersKeysAndReadsBack()
    {
        var json = new BnbQuantizationConfig().ToJson().ToJsonString();
        Assert.Equal("{\"_load_in_4bit\":true,\"_load_in_8bit\":false,\"bnb_4bit_compute_dtype\":\"bfloat16\",\"bnb_4bit_quant_storage\":\"uint8\"," +
                     "\"bnb_4bit_quant_type\":\"nf4\",\"bnb_4bit_use_double_quant\":true,\"llm_int8_enable_fp32_cpu_offload\":false," +
                     "\"llm_int8_has_fp16_weight\":false,\"llm_int8_skip_modules\":null,\"llm_int8_threshold\":6.0,\"load_in_4bit\":true," +
                     "\"load_in_8bit\":false,\"quant_method\":\"bitsandbytes\"}", json);
        var old = JsonNode.Parse("{\"quantization_config\": {\"load_in_4bit\": true, \"bnb_4bit_quant_type\": \"nf4\", \"bnb_4bit_compute_dtype\": \"float16\"}}")!.AsObject();
        var cfg = BnbQuantizationConfig.FromConfig(old)!;
        Assert.Equal("uint8", cfg.QuantStorage);
        Assert.Equal(FloatType.Float16, cfg.ComputeDType);
        Assert.False(cfg.DoubleQuant);
        Assert.Null(BnbQuantizationConfig.FromConfig(new JsonObject()));
        Assert.Throws<FormatException>(() => BnbQuantizationConfig.FromConfig(JsonNode.Parse("{\"quantization_config\": {\"quant_method\": \"gptq\"}}")!.AsObject()));
    }

    /// <summary>A tensor source over entries in memory, independent of the safetensors code.</summary>
    private sealed class InMemoryTensors(IEnumerable<BnbCheckpointLayout.Entry> entries) : ITensorSource
    {
        private readonly Dictionary<string, BnbCheckpointLayout.Entry> _byName = entries.ToDictionary(e => e.Name);
        public IReadOnlyList<TensorInfo> Tensors => _byName.Values.Select(e => GetInfo(e.Name)).ToList();
        public bool Contains(string name) => _byName.ContainsKey(name);
        public TensorInfo GetInfo(string name) => _byName.TryGetValue(name, out var e)
            ? new TensorInfo(e.Name, e.DType, e.Shape, 0, e.Data.LongLength)
            : throw new FormatException($"no tensor {name}");
        public byte[] ReadBytes(string name) => GetInfo(name) is { } ? _byName[name].Data : [];
    }
}
