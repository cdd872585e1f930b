using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// The planner against a measured step: a small model the test builds runs real QLoRA steps (forward, chunked loss,
/// backward through the checkpoints, paged AdamW) while resident anonymous memory is sampled.
/// </summary>
public class PlannerCalibrationTests(ITestOutputHelper output)
{
    /// <summary>
    /// What is compared: the step's peak above resident memory at the step's start (model, LoRA weights and gradients,
    /// optimizer state and the runtime are all in that baseline, after a warm-up step), measured in a fresh process,
    /// against the planned peak minus the planned persistent components. The absolute peak above a pre-model baseline is printed but not asserted:
    /// loading leaves managed-heap garbage and JIT-compiled code (about 10 MB here) that the planner counts as
    /// framework overhead, which is large against these tiny models.
    /// </summary>
    private void AssertTransientWithin15Percent(LlamaConfig config, PlanOptions o) => AssertTransientWithin(config, o, -0.15, 0.15);

    private void AssertTransientWithin(LlamaConfig config, PlanOptions o, double below, double above)
    {
        var plan = MemoryPlanner.Plan(config, o with { FrameworkOverheadBytes = 0 }); // the runtime is in the measured baseline
        output.WriteLine(plan.ToTable());
        long step = CalibrationProgram.MeasureInFreshProcess(config, o, output.WriteLine);
        long persistent = plan.Components.Where(c => c.Name is "quantized_weights" or "unquantized_weights" or "lora_weights" or "lora_gradients" or "optimizer_state").Sum(c => c.Bytes);
        long predicted = plan.PeakBytes - persistent;
        double error = (predicted - step) / (double)step;
        output.WriteLine($"transient: planned {predicted:N0}, measured {step:N0}, error {error:P1}");
        Assert.InRange(error, below, above);
    }

    [Fact]
    public void CheckpointedStepWhoseLayerRecomputeSetsThePeak() =>
        AssertTransientWithin15Percent(StepMemoryMeasurement.Config(512, 1408, 4, 8, 2, 2000), new PlanOptions { SequenceLength = 512, MicroBatch = 1, LossChunkTokens = 128 });

    [Fact]
    public void CheckpointedStepWhoseLossChunkSetsThePeak() =>
        AssertTransientWithin15Percent(StepMemoryMeasurement.Config(256, 704, 2, 4, 2, 16000), new PlanOptions { SequenceLength = 256, MicroBatch = 2, LossChunkTokens = 256 });

    [Fact]
    public void LongSequenceWithOffloadedCheckpointsAndATiledMlp() =>
        AssertTransientWithin15Percent(StepMemoryMeasurement.Config(256, 2048, 3, 4, 2, 1000),
            new PlanOptions { SequenceLength = 3072, MicroBatch = 1, LossChunkTokens = 256, OffloadCheckpoints = true, MlpTileTokens = 512 });

    /// <summary>
    /// All the long-context mechanisms together on a model with 4 query heads per K/V head: offloaded checkpoints, the
    /// tiled MLP, token-tiled norms and attention by K/V group (the planner's saved q, k, v at their own widths and the
    /// per-group recompute in backward against what libtorch's SDPA really keeps for an expanded K/V head). The planner
    /// is conservative here: it planned +17 % over the measured transient at 2,048 tokens (and −13 % at 4,096, a run
    /// too slow for a test), so the bound is −15 %…+25 %.
    /// </summary>
    [Fact]
    public void LongSequenceWithTiledNormsAndAttentionByGroup() =>
        AssertTransientWithin(StepMemoryMeasurement.Config(256, 2048, 3, 8, 2, 1000),
            new PlanOptions { SequenceLength = 2048, MicroBatch = 1, LossChunkTokens = 256, OffloadCheckpoints = true, MlpTileTokens = 512, NormTileTokens = 512, AttentionByGroup = true }, -0.15, 0.25);

    /// <summary>
    /// A large rank on a hidden-256 model, where the LoRA parts outweigh the model: the saved x·Aᵀ of every adapted
    /// projection, the cast A and B, their gradients, the dropout copies and noise, and the gradient norm's float64 copy
    /// (a training step once left those copies to the finalizer: 16 bytes per LoRA parameter per step, +150 MB here, so
    /// the measured transient was several times the plan). The planner is conservative here: it planned +15 % to +18 %
    /// over the measured transient (r = 1024 and 2048, with and without dropout), so the bound is −15 %…+25 %.
    /// </summary>
    [Fact]
    public void LargeRankStepWithDropout()
    {
        var config = StepMemoryMeasurement.Config(256, 688, 2, 4, 2, 259);
        var o = new PlanOptions { SequenceLength = 256, MicroBatch = 2, LossChunkTokens = 256, LoraRank = 1024, LoraDropout = 0.1, OptimizerBits = 8, PagedOptimizer = false };
        AssertTransientWithin(config, o, -0.15, 0.25);
    }

    [Fact]
    public void CheckpointedDoraStep() =>
        AssertTransientWithin15Percent(StepMemoryMeasurement.Config(512, 1408, 4, 8, 2, 2000), new PlanOptions { SequenceLength = 512, MicroBatch = 1, LossChunkTokens = 128, UseDora = true });

    [Fact]
    public void StepWithoutCheckpointing() =>
        AssertTransientWithin15Percent(StepMemoryMeasurement.Config(384, 1024, 4, 6, 6, 2000), new PlanOptions { SequenceLength = 384, MicroBatch = 1, LossChunkTokens = 128, GradientCheckpointing = false });
}

/// <summary>
/// Measures one real QLoRA step's memory in this process: run by <see cref="CalibrationProgram"/> in a fresh process of
/// its own, because a test host that has run other tests carries their state (tens of MB that come and go during a
/// step whatever the step does).
/// </summary>
internal static partial class StepMemoryMeasurement
{
    // glibc keeps freed heap blocks resident, and its dynamic mmap threshold moves blocks of up to 32 MiB onto the heap
    // once a block that size was freed, so resident memory would measure the allocator's history (earlier tests, the
    // weights' float32 staging) instead of what the step's live tensors need. A fixed threshold and trim limit make
    // every block of 128 KiB or more its own mapping, returned when freed: resident memory then follows live tensors,
    // which is what the planner predicts (and what a caching device allocator approximates).
    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "mallopt")]
    private static partial int MallOpt(int param, int value);
    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "malloc_trim")]
    private static partial int MallocTrim(nuint pad);
    private const int M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3;

    private static void SettleAllocator()
    {
        MallOpt(M_MMAP_THRESHOLD, 128 * 1024);
        MallOpt(M_TRIM_THRESHOLD, 128 * 1024);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        MallocTrim(0);
    }

    private static long PeakResident() => ReadStatus("VmHWM:");
    private static long FileResident() => ReadStatus("RssFile:") + ReadStatus("RssShmem:");

    private static long ReadStatus(string field)
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith(field, StringComparison.Ordinal))
                return long.Parse(line[field.Length..].Trim().Split(' ')[0]) * 1024;
        return 0;
    }

    public static (long Measured, long MeasuredStep) Measure(LlamaConfig config, PlanOptions o, Action<string> output)
    {
        using (ones(8).sum()) { } // libtorch loaded and initialised
        SettleAllocator();
        long before = ResidentMemory.AnonymousBytes();
        var model = LlamaForCausalLM.CreateRandom(config, 3);
        model.ApplyLora(new LoraOptions { Rank = o.LoraRank, Alpha = 2 * o.LoraRank, Dropout = o.LoraDropout, TargetModules = o.LoraTargets, UseDora = o.UseDora }, new Generator(4));
        model.GradientCheckpointing = o.GradientCheckpointing;
        model.OffloadCheckpoints = o.GradientCheckpointing && o.OffloadCheckpoints;
        new LongContextSwitches(o.MlpTileTokens, o.NormTileTokens, o.AttentionByGroup).Apply(model);
        model.LossChunkTokens = o.LossChunkTokens;
        model.train();
        using var _m = model;
        using var optimizer = new BnbAdamW(model.ParameterGroups(1e-4), new AdamWOptions { StateBits = o.OptimizerBits, Paged = o.PagedOptimizer });
        var gen = new Generator(5);
        void Step()
        {
            using var scope = NewDisposeScope();
            var ids = randint(0, config.VocabSize, [o.MicroBatch, o.SequenceLength], generator: gen);
            var (sum, n) = model.Loss(ids, ids);
            Checkpoint.Backward(sum / n);
            TrainingRun.GradNorm(optimizer); // what a training step does between backward and the update
            optimizer.Step();
            optimizer.ZeroGrad();
        }
        Step(); // warm-up: gradients exist from here on, as in every later step
        // Three measured steps, the smallest peak kept: what else the process does meanwhile (tiered JIT recompiling hot
        // methods, a thread's first malloc arena) only ever adds to a sample.
        long peak = long.MaxValue, stepBase = 0;
        for (int i = 0; i < 3; i++)
        {
            SettleAllocator();
            File.WriteAllText("/proc/self/clear_refs", "5"); // restart the kernel's high-water mark
            long file = FileResident();
            using var sampler = new PeakMemorySampler(1);
            Step();
            sampler.Sample();
            long p = Math.Max(sampler.PeakBytes, PeakResident() - file);
            output($"step {i}: {p - sampler.Baseline:N0} above its start");
            if (p - sampler.Baseline < peak - stepBase) (peak, stepBase) = (p, sampler.Baseline);
        }
        output($"measured: {peak - before:N0} above the pre-model baseline; step base {stepBase - before:N0}; step peak {peak - stepBase:N0} above the step's start");
        return (peak - before, peak - stepBase);
    }

    public static LlamaConfig Config(int hidden, int inter, int layers, int heads, int kvHeads, int vocab) => new()
    {
        HiddenSize = hidden, IntermediateSize = inter, NumHiddenLayers = layers, NumAttentionHeads = heads, NumKeyValueHeads = kvHeads,
        VocabSize = vocab, HeadDim = hidden / heads, RmsNormEps = 1e-5, RopeTheta = 10000, MaxPositionEmbeddings = 4096,
    };
}
