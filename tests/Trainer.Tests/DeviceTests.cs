using QLora.Kernels;
using QLora.Quant;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>The device switch: parsing, resolution on a machine without a GPU, and what the CUDA path relies on that the CPU can prove.</summary>
public class DeviceTests
{
    internal static bool CudaUsable => cuda.is_available() && DeviceSelector.Diagnose(0).Count == 0;

    [Theory]
    [InlineData(null, DeviceRequestKind.Auto, -1)]
    [InlineData("auto", DeviceRequestKind.Auto, -1)]
    [InlineData("CPU", DeviceRequestKind.Cpu, -1)]
    [InlineData("cuda", DeviceRequestKind.Cuda, 0)]
    [InlineData(" Cuda:3 ", DeviceRequestKind.Cuda, 3)]
    public void DeviceNamesParseAsPyTorchSpellsThem(string? text, DeviceRequestKind kind, int ordinal)
    {
        Assert.True(DeviceRequest.TryParse(text, out var r));
        Assert.Equal(kind, r.Kind);
        Assert.Equal(ordinal, r.Ordinal);
    }

    [Fact]
    public void PlainCudaLeavesTheDeviceToTheRankWhileANumberedOneIsKept()
    {
        // Under mpirun, "cuda" (and auto) take the local rank's device; "cuda:0" is the user's explicit choice.
        Assert.False(DeviceRequest.Parse("cuda", "--device").Indexed);
        Assert.False(DeviceRequest.Parse("gpu", "--device").Indexed);
        Assert.True(DeviceRequest.Parse("cuda:0", "--device").Indexed);
        Assert.Equal("cuda:0", DeviceRequest.Parse("cuda:0", "--device").ToString());
        Assert.Null(MpiLaunch.LocalRank); // the test host was not started by an MPI launcher
    }

    [Theory]
    [InlineData("tpu")]
    [InlineData("cuda:")]
    [InlineData("cuda:-1")]
    [InlineData("cuda:x")]
    [InlineData("cuda0")]
    public void OtherDeviceNamesAreRefusedNamingTheSettingAndTheAllowedValues(string text)
    {
        Assert.False(DeviceRequest.TryParse(text, out _));
        var e = Assert.Throws<ArgumentException>(() => DeviceRequest.Parse(text, "--device"));
        Assert.Contains($"--device '{text}'", e.Message);
        Assert.Contains("cuda:N", e.Message);
    }

    [Fact]
    public void AJobDefaultsToAutoAndRejectsAnUnknownDevice()
    {
        var job = new TrainJob { Model = { Path = "m", Device = "tpu" }, Data = { TrainFile = "t" }, Output = { Dir = "o" } };
        Assert.Equal("auto", new TrainJob().Model.Device);
        var problem = Assert.Single(job.Validate());
        Assert.StartsWith("Model:Device = 'tpu': allowed values are auto", problem);
        job.Model.Device = "cuda:1";
        Assert.Empty(job.Validate());
    }

    [Fact]
    public void CpuNeverTouchesCudaAndAutoIsTheCpuWithoutAUsableGpu()
    {
        Assert.Same(ComputeDevice.Cpu, DeviceSelector.Resolve("cpu"));
        Assert.Equal("cpu", ComputeDevice.Cpu.Torch.ToString());
        var auto = DeviceSelector.Resolve("auto");
        Assert.Equal(CudaUsable ? DeviceKind.Cuda : DeviceKind.Cpu, auto.Kind);
    }

    [SkippableFact]
    public void AskingForCudaWithoutOneIsOneLineNamingWhatIsMissingAndWhatToDo()
    {
        Skip.If(CudaUsable, "CUDA is usable here");
        var e = Assert.Throws<DeviceUnavailableException>(() => DeviceSelector.Resolve("cuda:0", "Model:Device"));
        Assert.DoesNotContain('\n', e.Message);
        Assert.StartsWith("Model:Device cuda:0: CUDA cannot be used here: ", e.Message);
        Assert.EndsWith("or run on the CPU (Model:Device cpu).", e.Message);
        if (!CudaDriver.TryGetShared(out _, out _)) Assert.Contains("no usable NVIDIA driver", e.Message);
        if (!DeviceSelector.LibTorchHasCuda()) Assert.Contains("CPU build", e.Message);
        Assert.Contains("QLORA_LIBTORCH", e.Message);
    }

    [Fact]
    public void EmulatingASmallerCardOnTheCpuIsRefused()
    {
        var e = Assert.Throws<DeviceUnavailableException>(() => ComputeDevice.Cpu.EmulateCapacity(24_000_000_000));
        Assert.Contains("--emulate-vram", e.Message);
        Assert.Contains("CUDA device", e.Message);
    }

    [Fact]
    public void ASamplerOfASharedDeviceReportsItsPeakAboveTheBaseline()
    {
        long value = 1000;
        using (var shared = new PeakMemorySampler(() => Interlocked.Read(ref value), reportAboveBaseline: true, intervalMs: 1000))
        {
            Interlocked.Exchange(ref value, 1700);
            shared.Sample();
            Interlocked.Exchange(ref value, 1200);
            shared.Sample();
            Assert.Equal(1000, shared.Baseline);
            Assert.Equal(1700, shared.PeakBytes);
            Assert.Equal(700, shared.ReportedPeakBytes);
        }
        using var own = new PeakMemorySampler(() => Interlocked.Read(ref value), reportAboveBaseline: false, intervalMs: 1000);
        Assert.Equal(own.PeakBytes, own.ReportedPeakBytes);
    }

    [Fact]
    public void PlanningForCudaReplacesTheCpuRuntimeWithTheContextAndWorkspaces()
    {
        var config = TinyLlama.Config(layers: 4, hidden: 256, heads: 8, kvHeads: 4, vocab: 1000, inter: 512);
        var cpu = MemoryPlanner.Plan(config, new PlanOptions { SequenceLength = 256 });
        var gpu = MemoryPlanner.Plan(config, new PlanOptions { SequenceLength = 256, Device = DeviceKind.Cuda });
        Assert.Equal(PlanOptions.DefaultFrameworkOverheadBytes, cpu[StepMemorySimulation.FrameworkOverhead]);
        Assert.Equal(PlanOptions.CudaContextBytes + PlanOptions.CudaWorkspaceBytes, gpu[StepMemorySimulation.FrameworkOverhead]);
        long extra = PlanOptions.CudaContextBytes + PlanOptions.CudaWorkspaceBytes - PlanOptions.DefaultFrameworkOverheadBytes;
        Assert.Equal(extra, gpu.PeakBytes - cpu.PeakBytes);
        Assert.Contains("estimated", gpu.Components.Single(c => c.Name == StepMemorySimulation.FrameworkOverhead).Description);
    }

    [Fact]
    public void NormsAndEmbeddingsFollowModuleToThroughTheirPropertySetter()
    {
        // Module.to hands moved parameters to a public property of the same name: the same path moves them to a GPU.
        using var norm = new RmsNorm(8, 1e-5, ScalarType.Float32);
        norm.to(ScalarType.BFloat16);
        Assert.Equal(ScalarType.BFloat16, norm.weight.dtype);
        Assert.Same(norm.weight, norm.named_parameters().Single().parameter);
        using var embed = new FrozenEmbedding(arange(12, dtype: ScalarType.Float32).view(3, 4));
        embed.to(ScalarType.Float64);
        Assert.Equal(ScalarType.Float64, embed.weight.dtype);
        Assert.False(embed.weight.requires_grad);
        Assert.Equal(9.0, embed.forward(tensor(new long[] { 2 }))[0, 1].item<double>());
    }

    [Fact]
    public void WithoutStateOrReseedARecomputeDrawsOtherMasks()
    {
        // The control for LlamaModelTests' checkpointing test with reseeding: a checkpoint that neither restores the
        // generator's state nor reseeds it draws other masks in the recompute, so that test's equality is the reseed's doing.
        using var scope = NewDisposeScope();
        var w = randn(16, 16, generator: new Generator(3));
        Tensor Block(Tensor x, IReadOnlyList<Tensor> _) => nn.functional.dropout(x.matmul(w), 0.5, training: true);
        Tensor Grad(bool checkpoint)
        {
            torch.manual_seed(5);
            var x = randn(4, 16, generator: new Generator(4)).requires_grad_(true);
            var y = checkpoint ? Checkpoint.Run(Block, x, preserveRngState: false) : Block(x, []);
            Checkpoint.Backward(y.sum());
            return x.grad!.clone();
        }
        Assert.False(Grad(true).eq(Grad(false)).all().item<bool>());
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void TheTensorUpdateForCudaFollowsTheCpuUpdate(ScalarType dtype)
    {
        // BnbAdamW's 32-bit state on CUDA is updated by tensor operations; on the CPU they must follow the span loop to
        // float32 rounding (libtorch's vectorised kernels may fuse a multiply and an add), non-finite gradients included.
        using var scope = NewDisposeScope();
        var reference = new Parameter(randn(33, 17, generator: new Generator(1)).to(dtype));
        var viaTensors = new Parameter(reference.detach().clone());
        var start = reference.detach().clone();
        using var opt = new BnbAdamW([new ParameterGroup([("w", reference)])], new AdamWOptions { LearningRate = 1e-2, WeightDecay = 0.1 });
        var m = zeros(reference.numel());
        var v = zeros(reference.numel());
        for (int t = 1; t <= 5; t++)
        {
            var g = (randn(33, 17, generator: new Generator((ulong)(10 + t))) * 0.1).to(dtype);
            if (t == 3) { g[0, 0] = float.NaN; g[1, 1] = float.PositiveInfinity; }
            reference.grad = g.clone();
            opt.Step();
            var step = AdamW8bitStep.Create(1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f, t);
            BnbAdamW.UpdateWithTensors(viaTensors, g, m, v, step);
        }
        double tolerance = dtype == ScalarType.BFloat16 ? 1.0 / 128 : 1e-6; // one bfloat16 step, or float32 rounding
        Assert.True(reference.to(ScalarType.Float64).allclose(viaTensors.to(ScalarType.Float64), rtol: tolerance, atol: 1e-7),
            "the tensor update differs from the CPU update");
        Assert.False(start.allclose(viaTensors.detach(), rtol: 1e-3, atol: 1e-4), "the updates moved nothing");
    }

    [SkippableFact]
    public void OnCudaTheModelLoadsTrainsAndAgreesWithTheCpu()
    {
        Skip.IfNot(CudaUsable, "needs a CUDA device, a CUDA libtorch and the NVIDIA driver");
        var device = DeviceSelector.Resolve("cuda");
        var c = TinyLlama.Config();
        var losses = new List<float>();
        foreach (var on in new[] { ComputeDevice.Cpu, device })
        {
            using var scope = NewDisposeScope();
            using var m = LlamaForCausalLM.CreateRandom(c, 6, device: on.Torch);
            Assert.Equal(on.Torch.type, m.Device.type);
            m.ApplyLora(new LoraOptions { Rank = 4, Alpha = 8 }, new Generator(2));
            m.train();
            using var opt = new BnbAdamW(m.ParameterGroups(1e-3), new AdamWOptions { StateBits = 8, MinEightBitSize = 1, Paged = true });
            var ids = tensor(new long[,] { { 1, 2, 3, 4, 5, 6, 7, 8 } }, device: on.Torch);
            for (int step = 0; step < 3; step++)
            {
                var (sum, n) = m.Loss(ids, ids);
                Checkpoint.Backward(sum / n);
                opt.Step();
                opt.ZeroGrad();
                losses.Add((sum / n).item<float>());
            }
        }
        for (int i = 0; i < 3; i++) Assert.True(Math.Abs(losses[i] - losses[3 + i]) <= 2e-2 * Math.Abs(losses[i]), $"step {i}: cpu {losses[i]} vs cuda {losses[3 + i]}");
        Assert.True(device.UsedBytes() > 0);
    }
}
