using System.CommandLine;
using QLora.Trainer;
using TorchSharp;

namespace QLora.Cli;

/// <summary><c>qlora bench memory</c>: measured peak device memory and step time of a QLoRA step on a model of true shape.</summary>
internal static class MemoryBenchmarkVerb
{
    public static Command Create(TextWriter stdout)
    {
        var preset = new Option<string?>("--preset") { Description = $"model shape: {string.Join(", ", ModelPresets.Names)} (not needed with --from-folder alone)" };
        var stream = new Option<bool>("--stream") { Description = "stream the decoder layers from a bnb-4bit checkpoint on disk (written to --scratch once)" };
        var seq = new Option<int>("--seq") { Description = "tokens per sequence", DefaultValueFactory = _ => 512 };
        var rank = new Option<int>("--rank") { Description = "LoRA rank on every linear layer", DefaultValueFactory = _ => 16 };
        var steps = new Option<int>("--steps") { Description = "training steps", DefaultValueFactory = _ => 1 };
        var window = new Option<int>("--window") { Description = "decoder layers resident at once when streaming", DefaultValueFactory = _ => 2 };
        var scratch = new Option<string>("--scratch") { Description = "folder for the streamed checkpoint", DefaultValueFactory = _ => Path.Combine("scratch", "bench-memory") };
        var lossChunk = new Option<int?>("--loss-chunk") { Description = "tokens per chunk of the fp32 loss (default: the model's, 1024)" };
        var layers = new Option<int?>("--layers") { Description = "override the preset's decoder layer count (e.g. to extrapolate)" };
        var hidden = new Option<int?>("--hidden") { Description = "override hidden_size" };
        var intermediate = new Option<int?>("--intermediate") { Description = "override intermediate_size" };
        var heads = new Option<int?>("--heads") { Description = "override num_attention_heads (head_dim = hidden / heads)" };
        var kvHeads = new Option<int?>("--kv-heads") { Description = "override num_key_value_heads" };
        var vocab = new Option<int?>("--vocab") { Description = "override vocab_size" };
        var mlpTile = new Option<int>("--mlp-tile") { Description = "sequence-tiled MLP: tokens per tile (0: off), as Training:MlpTileTokens" };
        var normTile = new Option<int>("--norm-tile") { Description = "token-tiled RMSNorms: tokens per tile (0: off), as Training:NormTileTokens" };
        var byGroup = new Option<bool>("--attention-by-group") { Description = "grouped-query attention a K/V group at a time, as Training:AttentionByGroup" };
        var fromFolder = new Option<string?>("--from-folder") { Description = "measure a whole real qlora train job (load, steps, eval, checkpoint, adapter, loss plot) on this Hugging Face folder" };
        var writeFolder = new Option<string?>("--write-folder") { Description = "first write the preset's random weights into --from-folder: 'dense' (bf16 shards, as downloaded) or 'bnb-4bit'; kept when it already holds them" };
        var shardBytes = new Option<long>("--shard-bytes") { Description = "largest shard of a written dense folder, in bytes", DefaultValueFactory = _ => 5_000_000_000 };
        var evalRows = new Option<int>("--eval-rows") { Description = "eval rows of a --from-folder job", DefaultValueFactory = _ => 2 };
        var device = DeviceOptions.Device();
        var emulate = DeviceOptions.EmulateVram();
        var cmd = new Command("memory", "Peak resident (device) memory and time of one QLoRA step (random NF4 base of a real shape, LoRA on all linear layers, checkpointing, paged AdamW), optionally streaming the layers from disk; with --from-folder, of a whole qlora train job.")
        {
            preset, stream, seq, rank, steps, window, scratch, lossChunk, layers, hidden, intermediate, heads, kvHeads, vocab, fromFolder, writeFolder, shardBytes, evalRows, mlpTile, normTile, byGroup, device, emulate,
        };
        // A usage error (exit code 2), as when a required option is missing: the preset may only be left out for --from-folder.
        cmd.Validators.Add(c =>
        {
            if (c.GetValue(preset) is null && c.GetValue(fromFolder) is null)
                c.AddError("--preset is required (a model shape to generate), unless --from-folder names an existing model folder");
        });
        cmd.SetAction(r =>
        {
            bool leanHeap = NativeHeap.UseLeanPolicy(); // before libtorch allocates: freed tensors go back to the system
            var on = DeviceSelector.Resolve(r.GetValue(device), "--device", stdout.WriteLine);
            if (r.GetValue(fromFolder) is not null && on.IsCuda)
                throw new ArgumentException("--from-folder measures a whole job on the CPU backend only for now (resident host memory); add --device cpu");
            using var reservation = DeviceOptions.Emulate(on, r.GetValue(emulate), stdout);
            using var sampler = on.CreateMemorySampler(); // the baseline: before anything is loaded (the context and any emulation reservation exist)
            string? name = r.GetValue(preset);
            if (r.GetValue(mlpTile) < 0 || r.GetValue(normTile) < 0) throw new ArgumentException("--mlp-tile and --norm-tile take 0 (off) or a positive number of tokens");
            var longContext = new LongContextSwitches(r.GetValue(mlpTile), r.GetValue(normTile), r.GetValue(byGroup));
            if (name is null)
            {
                if (r.GetValue(fromFolder) is not { } existing || r.GetValue(writeFolder) is not null)
                    throw new ArgumentException("--preset is required (a model shape to generate), unless --from-folder names an existing model folder");
                return RunJob(longContext, stdout, sampler, leanHeap, Path.GetFileName(Path.GetFullPath(existing).TrimEnd('/')), null, existing, null, 0, r.GetValue(seq), r.GetValue(steps),
                    r.GetValue(evalRows), r.GetValue(rank), r.GetValue(stream), r.GetValue(window), r.GetValue(lossChunk), r.GetValue(scratch)!);
            }
            var config = ModelPresets.Get(name);
            var overrides = new List<string>();
            int? Override(Option<int?> option, string flag)
            {
                var v = r.GetValue(option);
                if (v is null) return null;
                if (v <= 0) throw new ArgumentException($"{flag} {v}: must be positive");
                overrides.Add($"{flag} {v}");
                return v;
            }
            int? l = Override(layers, "--layers"), h = Override(hidden, "--hidden"), i = Override(intermediate, "--intermediate"),
                a = Override(heads, "--heads"), kv = Override(kvHeads, "--kv-heads"), v = Override(vocab, "--vocab");
            config = config with
            {
                NumHiddenLayers = l ?? config.NumHiddenLayers, HiddenSize = h ?? config.HiddenSize, IntermediateSize = i ?? config.IntermediateSize,
                NumAttentionHeads = a ?? config.NumAttentionHeads, NumKeyValueHeads = kv ?? config.NumKeyValueHeads, VocabSize = v ?? config.VocabSize,
            };
            if (h is not null || a is not null) config = config with { HeadDim = config.HiddenSize / config.NumAttentionHeads }; // presets keep their head_dim (Gemma: 256)
            if (l is not null && config.LayerTypes is { } types) // the preset's sliding/full pattern, repeated over the new depth
                config = config with { LayerTypes = Enumerable.Range(0, config.NumHiddenLayers).Select(n => types[n % types.Count]).ToList() };
            if (config.HiddenSize % config.NumAttentionHeads != 0 || config.NumAttentionHeads % config.NumKeyValueHeads != 0)
                throw new ArgumentException($"hidden {config.HiddenSize}, heads {config.NumAttentionHeads}, kv heads {config.NumKeyValueHeads}: hidden must be a multiple of heads, heads of kv heads");
            try { config.Validate(); }
            catch (FormatException e) { throw new ArgumentException(e.Message); }
            if (r.GetValue(fromFolder) is { } folder)
                return RunJob(longContext, stdout, sampler, leanHeap, name, config, folder, r.GetValue(writeFolder), r.GetValue(shardBytes), r.GetValue(seq), r.GetValue(steps),
                    r.GetValue(evalRows), r.GetValue(rank), r.GetValue(stream), r.GetValue(window), r.GetValue(lossChunk), r.GetValue(scratch)!);
            if (r.GetValue(writeFolder) is not null) throw new ArgumentException("--write-folder writes the folder of --from-folder; give both");
            var o = new MemoryBenchmark.Options
            {
                Preset = name.ToLowerInvariant(), Config = config, Sequence = r.GetValue(seq), Rank = r.GetValue(rank), Steps = r.GetValue(steps),
                Stream = r.GetValue(stream), StreamWindow = r.GetValue(window), ScratchFolder = r.GetValue(scratch)!, LossChunkTokens = r.GetValue(lossChunk),
                Device = on, LongContext = longContext,
            };
            string cpu = DequantBenchmark.CpuName();
            int cores = Environment.ProcessorCount;
            stdout.WriteLine($"bench memory: {o.Preset}{(overrides.Count > 0 ? $" with {string.Join(", ", overrides)}" : "")}: {config.NumHiddenLayers} layers, hidden {config.HiddenSize}, " +
                $"MLP {config.IntermediateSize}, {config.NumAttentionHeads}/{config.NumKeyValueHeads} heads, vocab {config.VocabSize}; seq {o.Sequence}, LoRA r={o.Rank}, " +
                $"{(o.Stream ? $"streamed (window {o.StreamWindow})" : "in memory")}; {cpu}, {cores} cores, {torch.get_num_threads()} torch threads; " +
                $"{(leanHeap ? "glibc heap: 1 MB mmap threshold, 2 arenas" : "default C heap")}; device {on.Description}");
            var result = MemoryBenchmark.Run(o, stdout.WriteLine, sampler);
            var res = result;
            // On CUDA the figure is the driver's used memory above the baseline taken after the context was created
            // (and any emulation reservation made), so the plan is compared without its CUDA-context share.
            string what = on.IsCuda ? "device memory in use (driver)" : "resident anonymous memory";
            long measured = on.IsCuda ? res.PeakBytes - res.BaselineBytes : res.PeakBytes;
            stdout.WriteLine($"baseline {what} (before loading): {res.BaselineBytes / 1e9:F2} GB");
            stdout.WriteLine($"model: {res.FourBitBytes / 1e9:F2} GB 4-bit projections{(o.Stream ? $" on disk ({res.CheckpointBytes / 1e9:F2} GB checkpoint in {res.CheckpointFolder})" : " in memory")}, " +
                $"{res.DenseBytes / 1e9:F2} GB dense bf16 (embeddings, lm_head, norms), LoRA {res.LoraParams / 1e6:F1} M fp32 parameters; " +
                $"paged AdamW: {res.OptimizerHostBytes / 1e9:F2} GB in host memory, {res.OptimizerDeviceBytes / 1e6:F1} MB device scratch");
            if (o.Stream)
                stdout.WriteLine($"streaming: {res.StreamLoads} layer copies ({res.StreamSyncLoads} not prefetched), at most {res.StreamMaxResident} of " +
                    $"{config.NumHiddenLayers} layers resident ({res.StreamLayerBytes / 1e6:F1} MB each); compute waited {res.StreamWaitSeconds:F1} s for copies");
            stdout.WriteLine((on.IsCuda ? $"measured peak device memory above the baseline: {measured / 1e9:F2} GB (the driver's used memory peaked at {res.PeakBytes / 1e9:F2} GB)"
                : $"measured peak resident anonymous memory: {res.PeakBytes / 1e9:F2} GB ({(res.PeakBytes - res.BaselineBytes) / 1e9:F2} GB above the baseline)") +
                (o.Stream ? $"; writing/checking the checkpoint peaked at {res.PreparePeakBytes / 1e9:F2} GB ({res.PrepareSeconds:F0} s)" : ""));
            var plan = MemoryPlanner.Plan(config, new PlanOptions
            {
                SequenceLength = o.Sequence, MicroBatch = 1, LoraRank = o.Rank, GradientCheckpointing = true, OptimizerBits = 32, PagedOptimizer = true,
                LossChunkTokens = o.LossChunkTokens ?? LlamaForCausalLM.DefaultLossChunkTokens, LayerStreaming = o.Stream, StreamingWindow = o.StreamWindow,
                // The generated in-memory model has no mapped file to read the embedding from; the streamed one loads from its folder.
                HostEmbedding = o.Stream,
                Device = on.Kind,
                MlpTileTokens = o.LongContext.MlpTileTokens, NormTileTokens = o.LongContext.NormTileTokens, AttentionByGroup = o.LongContext.AttentionByGroup,
            });
            long planned = on.IsCuda ? plan.PeakBytes - PlanOptions.CudaContextBytes : plan.PeakBytes;
            double planError = (double)measured / planned - 1;
            stdout.WriteLine($"planned peak (qlora plan, same settings): {planned / 1e9:F2} GB{(on.IsCuda ? " without the CUDA context (created before the baseline)" : "")} ({plan.PeakPhase}); measured is {planError:+0.0%;-0.0%} of planned");
            stdout.WriteLine($"step time: {res.ReportedStepSeconds:F1} s ({string.Join(", ", res.StepSeconds.Select(s => $"{s:F1}"))}); load {res.LoadSeconds:F1} s; loss {string.Join(", ", res.Losses.Select(x => $"{x:F3}"))}");
            stdout.WriteLine(Json.Line(new
            {
                bench = "memory", preset = o.Preset, overrides, layers = config.NumHiddenLayers, seq = o.Sequence, rank = o.Rank, steps = o.Steps,
                loss_chunk = o.LossChunkTokens,
                mlp_tile = o.LongContext.MlpTileTokens, norm_tile = o.LongContext.NormTileTokens, attention_by_group = o.LongContext.AttentionByGroup,
                stream = o.Stream, window = o.Stream ? o.StreamWindow : (int?)null,
                device = on.Name, emulated_vram_bytes = reservation is null ? (long?)null : ByteSize.Parse(r.GetValue(emulate)!),
                measured_peak_bytes = measured, baseline_bytes = res.BaselineBytes, peak_above_baseline_bytes = res.PeakBytes - res.BaselineBytes,
                planned_peak_bytes = planned, measured_over_planned = Math.Round(planError + 1, 4),
                step_s = Math.Round(res.ReportedStepSeconds, 3), step_times_s = res.StepSeconds.Select(s => Math.Round(s, 3)).ToArray(), load_s = Math.Round(res.LoadSeconds, 3),
                loss = res.Losses[^1], fourbit_bytes = res.FourBitBytes, dense_bytes = res.DenseBytes, lora_params = res.LoraParams,
                stream_loads = o.Stream ? res.StreamLoads : (int?)null, stream_max_resident_layers = o.Stream ? res.StreamMaxResident : (int?)null,
                stream_wait_s = o.Stream ? Math.Round(res.StreamWaitSeconds, 3) : (double?)null,
                lean_heap = leanHeap, hardware = new { cpu, cores, torch_threads = torch.get_num_threads() },
            }));
            return 0;
        });
        return cmd;
    }

    /// <summary>--from-folder: writes the folder if asked, then measures a whole train job on it beside its plan.</summary>
    private static int RunJob(LongContextSwitches longContext, TextWriter stdout, PeakMemorySampler sampler, bool leanHeap, string presetName, LlamaConfig? config, string folder,
        string? write, long shardBytes, int seq, int steps, int evalRows, int rank, bool stream, int window, int? lossChunk, string scratch)
    {
        if (write is not null)
        {
            var random = new RandomFourBitModel(config!);
            if (write.Equals("dense", StringComparison.OrdinalIgnoreCase)) random.WriteDenseFolder(folder, shardBytes, stdout.WriteLine);
            else if (write.Equals("bnb-4bit", StringComparison.OrdinalIgnoreCase)) random.WriteFolder(folder, stdout.WriteLine);
            else throw new ArgumentException($"--write-folder {write}: use 'dense' or 'bnb-4bit'");
            // Writing the folder is a one-off preparation (the download, in real use): measure from here on.
            ManagedHeap.ReturnFreeMemory();
            sampler.Reset();
        }
        string cpu = DequantBenchmark.CpuName();
        stdout.WriteLine($"bench memory --from-folder {folder}: a qlora train job, seq {seq}, {steps} step(s), {evalRows} eval row(s), LoRA r={rank}, " +
            $"{(stream ? $"streamed (window {window})" : "in memory")}; {cpu}, {Environment.ProcessorCount} cores, {torch.get_num_threads()} torch threads; " +
            $"{(leanHeap ? "glibc heap: 1 MB mmap threshold, 2 arenas" : "default C heap")}");
        long baseline = sampler.PeakBytes;
        var result = JobMemoryBenchmark.Run(new JobMemoryBenchmark.Options
        {
            ModelFolder = folder, WorkFolder = Path.Combine(scratch, "job-" + Path.GetFileName(Path.GetFullPath(folder).TrimEnd('/'))), Sequence = seq, Steps = steps,
            EvalRows = evalRows, Rank = rank, Stream = stream, StreamWindow = window, LossChunkTokens = lossChunk, LongContext = longContext,
        }, sampler, stdout.WriteLine);
        var summary = result.Run.Summary;
        sampler.Phase = "loss plot";
        string png = Path.Combine(summary.OutputDir, "loss.png");
        LossCurvePlot.Write(result.Run.State, png, $"{Path.GetFileName(folder)} QLoRA r={rank}");
        sampler.Phase = "end";
        var plan = result.Plan;
        double ratio = (double)sampler.PeakBytes / plan.PeakBytes;
        stdout.WriteLine($"measured peak resident anonymous memory of the whole job: {sampler.PeakBytes / 1e9:F2} GB during {sampler.PeakPhase} " +
            $"(baseline {baseline / 1e9:F2} GB); the run's own summary: {summary.PeakMemoryBytes / 1e9:F2} GB during {summary.PeakMemoryPhase}");
        stdout.WriteLine($"planned peak (qlora plan, same job): {plan.PeakBytes / 1e9:F2} GB ({plan.PeakPhase}); measured is {ratio - 1:+0.0%;-0.0%} of planned");
        stdout.WriteLine($"wall {summary.WallSeconds:F1} s; train loss {summary.TrainLoss}; eval loss {summary.EvalLoss}; output {summary.OutputDir}");
        stdout.WriteLine(Json.Line(new
        {
            bench = "memory", mode = "job", preset = presetName, folder, seq, steps, eval_rows = evalRows, rank, stream, window = stream ? window : (int?)null,
            layers = plan.Config.NumHiddenLayers,
            measured_peak_bytes = sampler.PeakBytes, peak_phase = sampler.PeakPhase, baseline_bytes = baseline,
            planned_peak_bytes = plan.PeakBytes, planned_peak_phase = plan.PeakPhase, measured_over_planned = Math.Round(ratio, 4),
            wall_s = summary.WallSeconds, train_loss = summary.TrainLoss, eval_loss = summary.EvalLoss,
            lean_heap = leanHeap, hardware = new { cpu, cores = Environment.ProcessorCount, torch_threads = torch.get_num_threads() },
        }));
        return 0;
    }
}
