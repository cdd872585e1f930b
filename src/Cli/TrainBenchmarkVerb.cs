using System.CommandLine;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// <c>qlora bench train</c>: a QLoRA step's throughput, MFU and dequantization overhead on this machine; under an MPI
/// launcher with several ranks, data-parallel scaling instead (the same global batch split across the ranks vs one process).
/// </summary>
internal static class TrainBenchmarkVerb
{
    public static Command Create(TextWriter stdout)
    {
        var d = new TrainBenchmark.Options();
        var layers = new Option<int>("--layers") { Description = "decoder layers", DefaultValueFactory = _ => d.Layers };
        var hidden = new Option<int>("--hidden") { Description = "hidden size", DefaultValueFactory = _ => d.Hidden };
        var intermediate = new Option<int>("--intermediate") { Description = "MLP width", DefaultValueFactory = _ => d.Intermediate };
        var heads = new Option<int>("--heads") { Description = "attention heads", DefaultValueFactory = _ => d.Heads };
        var kvHeads = new Option<int>("--kv-heads") { Description = "key/value heads", DefaultValueFactory = _ => d.KvHeads };
        var vocab = new Option<int>("--vocab") { Description = "vocabulary size", DefaultValueFactory = _ => d.Vocab };
        var seq = new Option<int>("--seq") { Description = "tokens per sequence", DefaultValueFactory = _ => d.Sequence };
        var batch = new Option<int>("--batch") { Description = "sequences per step", DefaultValueFactory = _ => d.Batch };
        var rank = new Option<int>("--rank") { Description = "LoRA rank", DefaultValueFactory = _ => d.Rank };
        var checkpointing = new Option<bool>("--checkpointing") { Description = "recompute layers in backward: true (default) or false", DefaultValueFactory = _ => true };
        var steps = new Option<int>("--steps") { Description = "timed steps per variant (median)", DefaultValueFactory = _ => d.Steps };
        var device = DeviceOptions.Device();
        var cmd = new Command("train", "A QLoRA step (NF4 base, bf16 compute, checkpointing, paged AdamW) vs the same step on dense bf16 weights, and the bf16 matmul rate.")
        {
            layers, hidden, intermediate, heads, kvHeads, vocab, seq, batch, rank, steps, checkpointing, device,
        };
        cmd.SetAction(r =>
        {
            var o = new TrainBenchmark.Options
            {
                Layers = r.GetValue(layers), Hidden = r.GetValue(hidden), Intermediate = r.GetValue(intermediate), Heads = r.GetValue(heads),
                KvHeads = r.GetValue(kvHeads), Vocab = r.GetValue(vocab), Sequence = r.GetValue(seq), Batch = r.GetValue(batch),
                Rank = r.GetValue(rank), Steps = r.GetValue(steps), Checkpointing = r.GetValue(checkpointing),
            };
            foreach (var (name, v) in new[] { ("--layers", o.Layers), ("--hidden", o.Hidden), ("--intermediate", o.Intermediate), ("--heads", o.Heads),
                         ("--kv-heads", o.KvHeads), ("--vocab", o.Vocab), ("--seq", o.Sequence), ("--batch", o.Batch), ("--rank", o.Rank), ("--steps", o.Steps) })
                if (v <= 0) throw new ArgumentException($"{name} {v}: must be positive");
            o = o with { Device = DeviceSelector.Resolve(r.GetValue(device), "--device", stdout.WriteLine) };
            using var ranks = DataParallel.Start("auto", TimeSpan.FromMinutes(30));
            if (ranks.Enabled) return DataParallelScaling(o, ranks, stdout);
            var result = TrainBenchmark.Run(o, stdout.WriteLine);
            stdout.WriteLine($"machine: {DequantBenchmark.CpuName()}, {result.Threads} torch threads; device {o.Device.Description}");
            stdout.WriteLine($"model: {result.Params / 1e6:F1} M parameters ({result.LinearParams / 1e6:F1} M in linear layers), LoRA r={o.Rank}: {result.LoraParams / 1e6:F2} M trainable; {o.Batch}x{o.Sequence} tokens per step");
            stdout.WriteLine($"QLoRA step: {result.QloraStepSeconds:F2} s ({result.TokensPerSecond:F0} tokens/s); dense bf16 step: {result.DenseStepSeconds:F2} s");
            stdout.WriteLine($"MFU: {result.Mfu:P1} of {result.MatmulGflops:F0} GFLOP/s bf16 matmul (target >= 40 %); dequantization overhead: {result.DequantOverhead:F3} (target <= 1.10)");
            stdout.WriteLine(result.ToJson(o.Device.Name));
            return 0;
        });
        return cmd;
    }

    static int DataParallelScaling(TrainBenchmark.Options o, DataParallel ranks, TextWriter stdout)
    {
        if (ranks.DefaultThreads > 0) TorchSharp.torch.set_num_threads(ranks.DefaultThreads);
        var r = TrainBenchmark.RunDataParallel(o, ranks, ranks.IsRoot ? stdout.WriteLine : null);
        if (ranks.IsRoot)
        {
            stdout.WriteLine($"machine: {DequantBenchmark.CpuName()}, {r.Ranks} ranks x {r.ThreadsPerRank} torch threads ({ranks.Collectives.Description})");
            stdout.WriteLine($"global batch {r.GlobalBatch}x{o.Sequence} tokens, LoRA r={o.Rank}: {r.LoraParams / 1e6:F2} M trainable, {r.LoraParams * 4 / 1e6:F2} MB all-reduced per step");
            stdout.WriteLine($"step: {r.StepSeconds:F3} s on {r.Ranks} ranks vs {r.OneProcessStepSeconds:F3} s in one process: speedup {r.Speedup:F2}, " +
                $"scaling efficiency {r.ScalingEfficiency:P1} (target >= 85 %); all-reduce {r.AllReduceSeconds:F4} s = {r.AllReduceShare:P1} of a step, " +
                $"waiting for the slowest rank {r.WaitSeconds:F3} s = {r.WaitShare:P1}");
            stdout.WriteLine(r.ToJson());
        }
        ranks.Finish();
        return 0;
    }
}
