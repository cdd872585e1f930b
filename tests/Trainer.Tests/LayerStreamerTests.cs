using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class LayerStreamerTests
{
    private const int Layers = 4;

    /// <summary>A tiny random Llama written as a bnb-4bit folder (quantized by the project's own quantizer).</summary>
    private static string BnbFolder(TempFolder dir, bool qwen = false)
    {
        var c = TinyLlama.Config(layers: Layers, qwen: qwen);
        HfModelLoaderTests.WriteFolder(dir.File("dense"), c, qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM");
        CheckpointQuantizer.QuantizeFolder(dir.File("dense"), dir.File("bnb"), new QuantizeOptions());
        return dir.File("bnb");
    }

    /// <summary>LoRA on every projection with identical, non-zero A and B in each model, so every LoRA weight gets a gradient.</summary>
    private static void AddLora(LlamaForCausalLM model, bool dora = false)
    {
        model.ApplyLora(new LoraOptions { Rank = 4, Alpha = 8, UseDora = dora }, new Generator(3));
        var gen = new Generator(4);
        using (no_grad())
            foreach (var (_, lora) in model.LoraLayers) lora.LoraB("default").normal_(0, 0.05, generator: gen);
        model.train();
    }

    private static (float Loss, Dictionary<string, Tensor> Grads) Step(LlamaForCausalLM model, Tensor ids)
    {
        var (sum, n) = model.Loss(ids, ids);
        using var loss = sum / n;
        Checkpoint.Backward(loss);
        var grads = model.TrainableParameters().ToDictionary(p => p.Name, p => p.Parameter.grad!.detach().clone());
        float value = loss.item<float>();
        sum.Dispose();
        return (value, grads);
    }

    private static void AssertSameBits(Tensor expected, Tensor actual, string what) =>
        Assert.True(expected.dtype == actual.dtype && expected.shape.SequenceEqual(actual.shape) && expected.eq(actual).all().item<bool>(), $"{what} differs");

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void StreamedLogitsEqualTheLoadedModelsBitForBit(bool qwen)
    {
        using var dir = new TempFolder();
        var folder = BnbFolder(dir, qwen);
        using var loaded = HfModelLoader.Load(folder);
        var log = new List<string>();
        using var streamed = HfModelLoader.Load(folder, new HfModelLoader.Options { Streaming = true }, log.Add);
        Assert.NotNull(streamed.Streamer);
        Assert.Null(loaded.Streamer);
        // The streamed projections hold no packed weights of their own.
        Assert.DoesNotContain(streamed.named_buffers(), b => b.name.EndsWith("_proj.weight", StringComparison.Ordinal));
        Assert.Contains(log, l => l.Contains("streamed from disk"));
        loaded.eval(); streamed.eval();
        var ids = tensor(new long[] { 1, 2, 3, 40, 50, 60, 7, 9 }).unsqueeze(0);
        using (no_grad()) AssertSameBits(loaded.Logits(ids), streamed.Logits(ids), "logits");
        Assert.True(streamed.Streamer!.MaxResidentLayers <= 2);
        // The KV-cache path streams too.
        using var cacheA = new KvCache(Layers);
        using var cacheB = new KvCache(Layers);
        using (no_grad()) AssertSameBits(loaded.LmHead(loaded.Forward(ids, cacheA)), streamed.LmHead(streamed.Forward(ids, cacheB)), "cached logits");
    }

    [Theory]
    [InlineData(true, 2)]
    [InlineData(true, 1)]
    [InlineData(true, 3)]
    [InlineData(false, 2)]
    public void StreamedLossAndLoraGradientsEqualTheLoadedModelsAndTheWindowHolds(bool checkpointing, int window)
    {
        using var dir = new TempFolder();
        var folder = BnbFolder(dir);
        using var loaded = HfModelLoader.Load(folder);
        using var streamed = HfModelLoader.Load(folder, new HfModelLoader.Options { Streaming = true, StreamWindow = window });
        var streamer = streamed.Streamer!;
        var counts = new List<int>();
        streamer.ResidencyChanged = resident => counts.Add(resident.Count);
        foreach (var m in new[] { loaded, streamed })
        {
            AddLora(m);
            m.GradientCheckpointing = checkpointing;
        }
        var ids = tensor(new long[] { 5, 1, 2, 3, 40, 50, 60, 7, 9, 11 }).unsqueeze(0);
        var (lossA, gradsA) = Step(loaded, ids);
        var (lossB, gradsB) = Step(streamed, ids);
        Assert.Equal(BitConverter.SingleToInt32Bits(lossA), BitConverter.SingleToInt32Bits(lossB));
        Assert.Equal(gradsA.Keys.Order(), gradsB.Keys.Order());
        Assert.Equal(Layers * 7 * 2, gradsA.Count);
        foreach (var (name, g) in gradsA)
        {
            Assert.True(g.abs().sum().item<float>() > 0, $"{name} got no gradient");
            AssertSameBits(g, gradsB[name], name);
        }
        Assert.NotEmpty(counts);
        Assert.All(counts, c => Assert.InRange(c, 0, window));
        Assert.InRange(streamer.MaxResidentLayers, 1, window);
        if (checkpointing && window >= 2)
        {
            // Forward and recompute prefetch every layer but the first; only layers the turnaround keeps are not copied again.
            Assert.Equal(1, streamer.SynchronousLoads);
            Assert.Equal(2 * Layers - window, streamer.Loads);
        }
        Assert.True(streamer.ResidentBytes <= window * streamer.LargestLayerBytes);
    }

    [Fact]
    public void StreamedDoraLossAndGradientsEqualTheLoadedModelsAndTheWindowHolds()
    {
        // DoRA's weight norm dequantizes each streamed weight again (at initialisation, and in every forward after the
        // layer's matmul): the same values and bits as the held weights, within the resident window.
        using var dir = new TempFolder();
        var folder = BnbFolder(dir);
        using var loaded = HfModelLoader.Load(folder);
        using var streamed = HfModelLoader.Load(folder, new HfModelLoader.Options { Streaming = true, StreamWindow = 2 });
        foreach (var m in new[] { loaded, streamed })
        {
            AddLora(m, dora: true);
            m.GradientCheckpointing = true;
        }
        var ids = tensor(new long[] { 5, 1, 2, 3, 40, 50, 60, 7, 9, 11 }).unsqueeze(0);
        var (lossA, gradsA) = Step(loaded, ids);
        var (lossB, gradsB) = Step(streamed, ids);
        Assert.Equal(BitConverter.SingleToInt32Bits(lossA), BitConverter.SingleToInt32Bits(lossB));
        Assert.Equal(Layers * 7 * 3, gradsA.Count);
        foreach (var (name, g) in gradsA) AssertSameBits(g, gradsB[name], name);
        Assert.InRange(streamed.Streamer!.MaxResidentLayers, 1, 2);
    }

    [Fact]
    public void StreamingNeedsABnbFolderAndAValidWindow()
    {
        using var dir = new TempFolder();
        var c = TinyLlama.Config(layers: 2);
        HfModelLoaderTests.WriteFolder(dir.File("dense"), c);
        var e = Assert.Throws<ArgumentException>(() => HfModelLoader.Load(dir.File("dense"), new HfModelLoader.Options { Streaming = true }));
        Assert.Contains("bnb-4bit", e.Message);
        CheckpointQuantizer.QuantizeFolder(dir.File("dense"), dir.File("bnb"), new QuantizeOptions());
        Assert.Throws<ArgumentOutOfRangeException>(() => HfModelLoader.Load(dir.File("bnb"), new HfModelLoader.Options { Streaming = true, StreamWindow = 0 }));
    }

    /// <summary>
    /// What a device's layer buffers need from the streamer (<see cref="CudaLayerBuffers"/>): buffers are rented and
    /// returned on the compute thread (a return records the compute stream), a buffer is filled once per rental and
    /// never returned before its fill ended, and once returned it is reused by the next layer. This pool reuses its
    /// buffers as the CUDA slots do, slows every fill down (a copy that is still running when compute wants the layer),
    /// and overwrites a buffer with garbage as soon as it is returned: the streamed step still equals the loaded
    /// model's bit for bit only if nothing reads a layer after its return or before its fill.
    /// </summary>
    private sealed unsafe class ReusingSlowBuffers(int computeThread) : ILayerBuffers
    {
        private readonly Lock _lock = new();
        private readonly Dictionary<nint, long> _capacity = [];
        private readonly HashSet<nint> _rented = [], _filled = [], _free = [];
        public List<string> Violations { get; } = [];
        public int Fills;

        private void Check(bool ok, string what) { if (!ok) lock (_lock) Violations.Add(what); }

        public nint Rent(long bytes)
        {
            Check(Environment.CurrentManagedThreadId == computeThread, "Rent off the compute thread");
            lock (_lock)
            {
                nint b = _free.FirstOrDefault(f => _capacity[f] >= bytes);
                if (b == 0)
                {
                    b = (nint)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)Math.Max(bytes, 1), 64);
                    _capacity[b] = Math.Max(bytes, 1);
                }
                _free.Remove(b);
                _rented.Add(b);
                return b;
            }
        }

        public void Fill(nint buffer, long bytes, Action<nint> write)
        {
            lock (_lock)
            {
                Check(_rented.Contains(buffer), "Fill of a buffer not rented");
                Check(!_filled.Contains(buffer), "second Fill in one rental");
            }
            Thread.Sleep(15); // the copy is late
            write(buffer);
            lock (_lock) _filled.Add(buffer);
            Interlocked.Increment(ref Fills);
        }

        public void Return(nint buffer)
        {
            Check(Environment.CurrentManagedThreadId == computeThread, "Return off the compute thread");
            lock (_lock)
            {
                Check(_rented.Remove(buffer), "Return of a buffer not rented");
                Check(_filled.Remove(buffer), "Return before the buffer's fill ended");
                new Span<byte>((void*)buffer, (int)_capacity[buffer]).Fill(0xFF); // the next layer's copy lands at once
                _free.Add(buffer);
            }
        }

        public void Dispose()
        {
            foreach (var b in _capacity.Keys) System.Runtime.InteropServices.NativeMemory.AlignedFree((void*)b);
            _capacity.Clear();
        }
    }

    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    public void LateCopiesIntoReusedBuffersAreWaitedForAndNeverReadAfterTheirReturn(int window)
    {
        using var dir = new TempFolder();
        var folder = BnbFolder(dir);
        using var loaded = HfModelLoader.Load(folder);
        var buffers = new ReusingSlowBuffers(Environment.CurrentManagedThreadId);
        var checkpoint = SafetensorsCheckpoint.Open(folder);
        var config = LlamaConfig.Load(Path.Combine(folder, "config.json"));
        var streamer = new LayerStreamer(checkpoint, Layers, window, CPU, buffers);
        using var streamed = LlamaForCausalLM.FromWeights(config, new SafetensorsModelWeights(checkpoint), projections: streamer);
        foreach (var m in new[] { loaded, streamed })
        {
            AddLora(m);
            m.GradientCheckpointing = true;
        }
        var ids = tensor(new long[] { 5, 1, 2, 3, 40, 50, 60, 7, 9, 11 }).unsqueeze(0);
        var (lossA, gradsA) = Step(loaded, ids);
        var (lossB, gradsB) = Step(streamed, ids);
        var (lossA2, _) = Step(loaded, ids);
        var (lossB2, _) = Step(streamed, ids); // a second step starts from layer 0 again, into reused buffers
        Assert.Empty(buffers.Violations);
        Assert.Equal(BitConverter.SingleToInt32Bits(lossA), BitConverter.SingleToInt32Bits(lossB));
        Assert.Equal(BitConverter.SingleToInt32Bits(lossA2), BitConverter.SingleToInt32Bits(lossB2));
        foreach (var (name, g) in gradsA) AssertSameBits(g, gradsB[name], name);
        Assert.Equal(streamer.Loads, buffers.Fills); // every copy went through the buffers
        Assert.True(streamer.Loads > window, $"{streamer.Loads} loads: no buffer was reused"); // so returned buffers were filled again
        Assert.True(streamer.WaitSeconds > 0, "the late copies were not waited for");
        Assert.InRange(streamer.MaxResidentLayers, 1, window);
    }

    [SkippableFact]
    public void OnCudaTheStreamedModelEqualsTheLoadedModelBitForBit()
    {
        Skip.IfNot(DeviceTests.CudaUsable, "needs a CUDA device, a CUDA libtorch and the NVIDIA driver");
        var device = DeviceSelector.Resolve("cuda").Torch;
        using var dir = new TempFolder();
        var folder = BnbFolder(dir);
        using var loaded = HfModelLoader.Load(folder, new HfModelLoader.Options { Device = device });
        using var streamed = HfModelLoader.Load(folder, new HfModelLoader.Options { Streaming = true, StreamWindow = 2, Device = device });
        foreach (var m in new[] { loaded, streamed })
        {
            AddLora(m);
            m.GradientCheckpointing = true;
        }
        var ids = tensor(new long[] { 5, 1, 2, 3, 40, 50, 60, 7, 9, 11 }, device: device).unsqueeze(0);
        for (int step = 0; step < 2; step++)
        {
            var (lossA, gradsA) = Step(loaded, ids);
            var (lossB, gradsB) = Step(streamed, ids);
            Assert.Equal(BitConverter.SingleToInt32Bits(lossA), BitConverter.SingleToInt32Bits(lossB));
            foreach (var (name, g) in gradsA) AssertSameBits(g, gradsB[name], name);
        }
        Assert.InRange(streamed.Streamer!.MaxResidentLayers, 1, 2);
        Assert.Equal(device.type, streamed.Streamer.Device.type);
    }
}
