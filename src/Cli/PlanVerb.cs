using System.CommandLine;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// <c>qlora plan</c>: the predicted memory of a QLoRA job on a model (folder, config.json or preset), component by
/// component, whether it fits a budget and what would make it fit; ends with one JSON line.
/// </summary>
internal static class PlanVerb
{
    public static Command Create(TextWriter stdout)
    {
        var d = new PlanOptions();
        var model = new Option<string>("--model") { Description = $"a model folder, a config.json, or a preset ({string.Join(", ", ModelPresets.Names)})", Required = true };
        var budget = new Option<string?>("--budget") { Description = "memory budget: 24GB (10^9), 24GiB (2^30), 8000MB, or bytes" };
        var stream = new Option<bool>("--stream") { Description = "layer streaming: keep the 4-bit weights in host memory, a window of layers resident" };
        var seq = new Option<int>("--seq") { Description = "tokens per sequence", DefaultValueFactory = _ => d.SequenceLength };
        var batch = new Option<int>("--batch") { Description = "sequences per micro-batch", DefaultValueFactory = _ => d.MicroBatch };
        var rank = new Option<int>("--rank") { Description = "LoRA rank (all linear layers)", DefaultValueFactory = _ => d.LoraRank };
        var dora = new Option<bool>("--dora") { Description = "DoRA (use_dora): magnitude vectors, and a weight norm per adapted layer and forward" };
        var dropout = new Option<double>("--dropout") { Description = "LoRA dropout (above 0 each adapted projection saves its own dropped input for backward)", DefaultValueFactory = _ => d.LoraDropout };
        var chunk = new Option<int>("--loss-chunk") { Description = "tokens per chunk of the fp32 loss", DefaultValueFactory = _ => d.LossChunkTokens };
        var noCheckpointing = new Option<bool>("--no-checkpointing") { Description = "keep every layer's activations instead of recomputing them" };
        var bits = new Option<int>("--optimizer-bits") { Description = "AdamW state: 32 or 8", DefaultValueFactory = _ => d.OptimizerBits };
        var noOffload = new Option<bool>("--no-offload") { Description = "keep the checkpointed layer inputs in device memory instead of offloading them to the host" };
        var noHostEmbedding = new Option<bool>("--no-host-embedding") { Description = "keep the input embedding table in device memory (it stays in host memory by default when untied)" };
        var mlpTile = new Option<int>("--mlp-tile") { Description = "sequence-tiled MLP: tokens per tile, each checkpointed on its own (0: off)", DefaultValueFactory = _ => d.MlpTileTokens };
        var normTile = new Option<int>("--norm-tile") { Description = "token-tiled RMSNorms: tokens per tile; each norm saves its input instead of a float32 copy (0: off)", DefaultValueFactory = _ => d.NormTileTokens };
        var byGroup = new Option<bool>("--attention-by-group") { Description = "grouped-query attention a K/V group at a time, recomputed in backward (no repeated K/V heads)" };
        var maxSeq = new Option<bool>("--max-seq") { Description = "also find the longest sequence (a multiple of 1024) that fits --budget with these settings" };
        var ranks = new Option<int>("--ranks") { Description = "data-parallel ranks (processes under mpirun/srun): adds the throughput model", DefaultValueFactory = _ => 1 };
        var microBatches = new Option<int?>("--micro-batches") { Description = "micro-batches per optimizer step across all ranks (default: one per rank)" };
        var noQuant = new Option<bool>("--no-quantize") { Description = "plain LoRA: the base's projections stay 16-bit in the compute dtype (Quantization:QuantType none)" };
        var device = DeviceOptions.Device("the device to plan for: auto (a CUDA device if this machine can use one, else the CPU), cpu, cuda or cuda:N; cuda adds the CUDA context and library workspaces (estimated)");
        var cmd = new Command("plan", "Predict a QLoRA job's peak memory (NF4+DQ base, bf16 compute, LoRA on all linear layers, checkpointing, paged AdamW) and check it against a budget.")
        {
            model, budget, stream, seq, batch, rank, dora, dropout, bits, chunk, noCheckpointing, noOffload, noHostEmbedding, mlpTile, normTile, byGroup, maxSeq, ranks, microBatches, noQuant, device,
        };
        cmd.SetAction(r =>
        {
            string name = r.GetValue(model)!;
            var config = ModelPresets.Resolve(name);
            var options = d with
            {
                SequenceLength = r.GetValue(seq), MicroBatch = r.GetValue(batch), LoraRank = r.GetValue(rank), UseDora = r.GetValue(dora), LoraDropout = r.GetValue(dropout), OptimizerBits = r.GetValue(bits),
                LossChunkTokens = r.GetValue(chunk), GradientCheckpointing = !r.GetValue(noCheckpointing), LayerStreaming = r.GetValue(stream), BudgetBytes = r.GetValue(budget) is { } b ? ByteSize.Parse(b) : null,
                OffloadCheckpoints = !r.GetValue(noOffload), HostEmbedding = !r.GetValue(noHostEmbedding), MlpTileTokens = r.GetValue(mlpTile), NormTileTokens = r.GetValue(normTile), AttentionByGroup = r.GetValue(byGroup),
                QuantizeBase = !r.GetValue(noQuant),
                Device = DeviceSelector.PlanTarget(DeviceRequest.Parse(r.GetValue(device), "--device")),
            };
            if (r.GetValue(maxSeq) && options.BudgetBytes is null) throw new ArgumentException("--max-seq needs --budget: the longest sequence that fits what?");
            int n = r.GetValue(ranks), steps = r.GetValue(microBatches) ?? n;
            if (n < 1) throw new ArgumentException($"--ranks {n}: must be positive");
            if (steps < n) throw new ArgumentException($"--micro-batches {steps}: every one of the {n} ranks needs at least one");
            var plan = MemoryPlanner.Plan(config, options);
            var parallel = n > 1 ? DataParallelPlan.Of(config, options, plan, steps, n) : null;
            var c = plan.Config;
            stdout.WriteLine($"{name}: {c.NumHiddenLayers} layers, hidden {c.HiddenSize}, intermediate {c.IntermediateSize}, heads {c.NumAttentionHeads}/{c.NumKeyValueHeads}, vocab {c.VocabSize}");
            stdout.WriteLine($"job: {options.MicroBatch} x {options.SequenceLength} tokens, {(options.UseDora ? "DoRA" : "LoRA")} r={options.LoraRank} on {string.Join(", ", options.LoraTargets)}, " +
                $"{(options.GradientCheckpointing ? "checkpointing" : "no checkpointing")}, {(options.PagedOptimizer ? "paged " : "")}{options.OptimizerBits}-bit AdamW, " +
                $"loss chunk {options.LossChunkTokens}{(options.QuantizeBase ? "" : ", 16-bit base (no quantization)")}{(options.LayerStreaming ? $", layer streaming ({options.StreamingWindow} resident)" : "")}" +
                $"{(options.GradientCheckpointing && options.OffloadCheckpoints ? ", offloaded checkpoints" : "")}{(options.MlpTileTokens > 0 ? $", MLP in tiles of {options.MlpTileTokens} tokens" : "")}" +
                $"{(options.NormTileTokens > 0 ? $", norms in tiles of {options.NormTileTokens} tokens" : "")}{(options.AttentionByGroup ? ", attention by K/V group" : "")}; " +
                $"on {(options.Device == QLora.Kernels.DeviceKind.Cuda ? "a CUDA device" : "the CPU")}");
            stdout.WriteLine(plan.ToTable());
            var doraCost = MemoryPlanner.DoraWeightNormCost(config, options);
            if (options.UseDora)
                stdout.WriteLine($"DoRA time: {doraCost.Norms:N0} weight norms per micro-batch (one per adapted projection and forward{(options.GradientCheckpointing ? ", the checkpoint recompute included" : "")}), " +
                    $"each dequantizing its weight again and forming W + scaling·B·A in float32: {doraCost.Elements / 1e9:F2} G elements, {doraCost.Flops / 1e9:F1} GFLOP for B·A");
            int? longest = r.GetValue(maxSeq) ? MemoryPlanner.MaxSequenceLength(config, options, 1024) : null;
            if (longest is int m)
                stdout.WriteLine(m == 0 ? $"no sequence of 1024 tokens or more fits {ByteSize.Format(options.BudgetBytes!.Value)} with these settings"
                    : $"longest sequence that fits {ByteSize.Format(options.BudgetBytes!.Value)}: {m:N0} tokens (peak {ByteSize.Format(MemoryPlanner.Plan(config, options with { SequenceLength = m }).PeakBytes)})");
            if (parallel is not null) stdout.WriteLine(DataParallelPlan.Describe(config, options, plan, steps, n, "MPI"));
            stdout.WriteLine(Json.Line(new
            {
                plan = name,
                device = options.Device == QLora.Kernels.DeviceKind.Cuda ? "cuda" : "cpu",
                budget_bytes = plan.BudgetBytes,
                peak_bytes = plan.PeakBytes,
                fits = plan.Fits,
                peak_phase = plan.PeakPhase,
                trainable_params = plan.TrainableParameters,
                dora_weight_norms_per_micro_batch = options.UseDora ? doraCost.Norms : (int?)null,
                components = plan.Components.ToDictionary(x => x.Name, x => x.Bytes),
                host = plan.HostComponents.ToDictionary(x => x.Name, x => x.Bytes),
                suggestions = plan.Suggestions.Select(s => new { change = s.Change, peak_bytes = s.PeakBytes }).ToList(),
                max_seq = longest,
                data_parallel = parallel is null ? null : new
                {
                    ranks = parallel.Ranks, micro_batches_per_rank = parallel.MicroBatchesPerRank, tokens_per_rank = parallel.TokensPerRank,
                    gflop_per_rank = Math.Round(parallel.FlopsPerRank / 1e9, 3), allreduce_bytes = parallel.AllReduceBytes, ring_bytes_per_rank = parallel.RingBytesPerRank,
                },
            }));
            return 0;
        });
        return cmd;
    }
}
