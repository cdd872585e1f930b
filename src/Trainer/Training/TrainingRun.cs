using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Runs a <see cref="TrainJob"/>: loads and quantizes the base, applies LoRA, prepares the data, trains with
/// token-normalised gradient accumulation, evaluates, checkpoints (atomically, resumable bit-exactly on CPU), and writes
/// the adapter (PEFT format), job.json, train_log.jsonl and run_summary.json into the output folder.
/// </summary>
public sealed class TrainingRun
{
    /// <summary>How this invocation runs the job (not part of the job itself).</summary>
    public sealed record RunOptions
    {
        /// <summary>null for a fresh run, "latest", or a checkpoint folder.</summary>
        public string? Resume { get; init; }
        /// <summary>Progress lines (phases, evaluations, checkpoints, warnings).</summary>
        public Action<string>? Log { get; init; }
        /// <summary>Called after every optimizer step.</summary>
        public Action<TrainProgress>? Progress { get; init; }
        /// <summary>Cancelled (Ctrl-C): the run saves a checkpoint at the next step boundary and returns.</summary>
        public CancellationToken Cancellation { get; init; }
        /// <summary>
        /// The sampler the run reports its peak memory from and names its phases to (a caller that measures more than
        /// the run, such as <c>qlora bench memory --from-folder</c>, passes its own); null: the run makes one.
        /// </summary>
        public PeakMemorySampler? MemorySampler { get; init; }
    }

    /// <summary>The result of a run.</summary>
    /// <param name="Summary">The figures.</param>
    /// <param name="State">Final trainer state (history included).</param>
    public sealed record Result(TrainSummary Summary, TrainerState State)
    {
        /// <summary>This process's rank in a data-parallel run (0 otherwise); only rank 0 wrote the output folder.</summary>
        public int Rank { get; init; }
    }

    const string OptimizerFile = "optimizer.safetensors";

    readonly TrainJob _job;
    readonly RunOptions _run;
    readonly string _out;
    TrainerState _state = new();
    PeakMemorySampler? _sampler;
    DataParallel _ranks = DataParallel.Single();
    bool _stopAgreed;

    TrainingRun(TrainJob job, RunOptions run)
    {
        _job = job;
        _run = run;
        _out = job.Output.Dir!;
    }

    void Log(string line)
    {
        if (_ranks.IsRoot) _run.Log?.Invoke(line);
    }

    /// <summary>Runs <paramref name="job"/> (already validated by <see cref="JobConfiguration"/>).</summary>
    public static Result Run(TrainJob job, RunOptions? run = null)
    {
        var problems = job.Validate();
        if (problems.Count > 0) throw new FormatException(string.Join("; ", problems));
        return new TrainingRun(job, run ?? new RunOptions()).Execute();
    }

    Result Execute()
    {
        var wall = Stopwatch.StartNew();
        using var ranks = _ranks = DataParallel.Start(_job.Training.DataParallel, TimeSpan.FromSeconds(_job.Training.CollectiveTimeoutSeconds));
        if (ranks.Check(_job.Training.GradientAccumulationSteps) is { } rankProblem) throw new InvalidOperationException(rankProblem);
        ranks.Log = line => _run.Log?.Invoke(line);
        var device = DeviceSelector.Resolve(_job.Model.Device, "Model:Device", Log);
        // The caller's sampler (one that measures more than the run), else the device's: the baseline is the device
        // before anything is loaded.
        using var ownSampler = _run.MemorySampler is null ? device.CreateMemorySampler() : null;
        var sampler = _sampler = _run.MemorySampler ?? ownSampler!;
        sampler.Phase = "plan";
        var output = new RunOutputFolder(_out);
        var checkpoints = new TrainingCheckpoints(output.CheckpointsDir, _job.Output.KeepLast);
        var modelPath = _job.Model.Path!;
        InputPaths.RequireFolder("Model:Path", modelPath, "a Hugging Face model folder");
        var config = LlamaConfig.Load(Path.Combine(modelPath, "config.json"));
        var plan = MemoryPlanner.Plan(config, PlanOptionsOf(_job) with { Device = device.Kind });
        Log($"device: {device.Description}");
        Log($"memory plan: peak {ByteSize.Format(plan.PeakBytes)} ({plan.PeakPhase})" + (plan.BudgetBytes is long b ? $" of the {ByteSize.Format(b)} budget" : ""));
        if (!plan.Fits)
        {
            var largest = plan.Components.OrderByDescending(c => c.Bytes).Take(3).Select(c => $"{c.Name} {ByteSize.Format(c.Bytes)}");
            var fixes = plan.Suggestions.Count == 0 ? "no single setting makes it fit; use a smaller model or a larger budget"
                : "settings that fit: " + string.Join("; ", plan.Suggestions.Select(x => $"{x.Change} (peak {ByteSize.Format(x.PeakBytes)})"));
            throw new InvalidOperationException($"the job is planned to peak at {ByteSize.Format(plan.PeakBytes)}, over Memory:Budget {_job.Memory.Budget} " +
                $"(largest parts: {string.Join(", ", largest)}); {fixes}. Nothing was loaded; see qlora plan for the full table.");
        }

        if (plan.BudgetBytes is null && device.Kind == QLora.Kernels.DeviceKind.Cpu && AvailableMemory.Bytes() is long available && plan.PeakBytes > available)
            throw new InvalidOperationException($"the job is planned to peak at {ByteSize.Format(plan.PeakBytes)}, more than the {ByteSize.Format(available)} this machine has available now; " +
                "lower Data:MaxSeqLength or Training:MicroBatchSize (qlora plan shows the parts), or set Memory:Budget to run it anyway. Nothing was loaded.");
        if (_job.Data.MaxSeqLength > config.MaxPositionEmbeddings)
            throw new InvalidOperationException($"Data:MaxSeqLength {_job.Data.MaxSeqLength} is longer than the model's max_position_embeddings {config.MaxPositionEmbeddings} " +
                $"({Path.Combine(modelPath, "config.json")}); positions beyond it were never trained. Set Data:MaxSeqLength to at most {config.MaxPositionEmbeddings}. Nothing was loaded.");
        if (ranks.Enabled) Log(DataParallelPlan.Describe(config, plan.Options, plan, _job.Training.GradientAccumulationSteps, ranks.WorldSize, ranks.Collectives.Description));

        // The folder has one writer (rank 0, for every rank); leftovers of an interrupted run are cleaned up. Nothing
        // of a previous run is moved before every input has been read and checked below.
        OutputFolderLock? owner = null;
        string? resumeFrom = ranks.OnRoot(() =>
        {
            owner = OutputFolderLock.Acquire(_out, "Output:Dir", Log);
            try
            {
                output.Recover(Log);
                return ChooseResume(checkpoints, output);
            }
            catch
            {
                owner.Dispose();
                throw;
            }
        }, "preparing the output folder");
        using var ownerLock = owner;

        var t = _job.Training;
        int threads = t.Threads > 0 ? t.Threads : ranks.DefaultThreads;
        if (threads > 0) set_num_threads(threads);
        manual_seed(ranks.RankSeed(t.Seed));
        sampler.Phase = "data";
        using var tokenizer = HfTokenizer.Load(modelPath);
        var template = ChooseTemplate(tokenizer, _job.Model.ChatTemplate, Log);
        var data = PrepareData(tokenizer, template);

        var dtype = ParseDType(_job.Model.ComputeDType);
        sampler.Phase = "load";
        using var model = HfModelLoader.Load(modelPath, LoaderOptionsOf(_job, device.Torch), Log);
        tokenizer.EnsureMatchesEmbedding(model.Config.VocabSize);
        sampler.Phase = "lora";
        model.GradientCheckpointing = t.GradientCheckpointing;
        model.OffloadCheckpoints = t.GradientCheckpointing && t.OffloadCheckpoints;
        t.LongContext.Apply(model);
        model.SegmentAttention = t.SegmentAttention;
        model.LossChunkTokens = t.LossChunkTokens;
        var lora = LoraOptionsOf(_job.Lora);
        var names = model.ApplyLora(lora, new Generator((ulong)t.Seed));
        var groups = model.ParameterGroups(t.LearningRate, t.LoraPlusRatio);
        long trainable = model.TrainableParameters().Sum(p => p.Parameter.numel());
        Log($"{(lora.UseDora ? "DoRA" : "LoRA")} r={lora.Rank} alpha={lora.Alpha} on {names.Count} modules: {trainable:N0} trainable parameters");
        using var optimizer = new BnbAdamW(groups, new AdamWOptions
        {
            LearningRate = t.LearningRate,
            WeightDecay = t.WeightDecay,
            StateBits = t.Optimizer.Equals("adamw8bit", StringComparison.OrdinalIgnoreCase) ? 8 : 32,
            Paged = t.PagedOptimizer,
        });

        var schedule = new BatchSchedule(data.TrainRows, t.MicroBatchSize, _job.Data.Shuffle, groupByLength: !_job.Data.Packing, t.Seed);
        int totalSteps = t.MaxSteps > 0 ? t.MaxSteps
            : Math.Max(1, (int)Math.Ceiling(t.Epochs * schedule.BatchesPerEpoch / t.GradientAccumulationSteps));
        var lr = new LearningRateSchedule(t.Scheduler, t.WarmupSteps, totalSteps, t.MinLearningRateRatio);
        var evaluator = new Evaluation(model, tokenizer, data.Encoder, data.EvalRows, data.EvalSamples, _job.Eval, PadId, Log, ranks,
            data.Choices, ChoicesAsText(_job));

        int? resumedFrom = null;
        // Everything is loaded and checked: a previous run is set aside now, and put back when this one ends without a
        // checkpoint of its own (disposed on every path out, errors included).
        using var previousRun = ranks.IsRoot && resumeFrom is null && output.HoldsRun() ? output.SetPreviousRunAside(Log) : null;
        if (resumeFrom is not null)
        {
            PeftAdapter.LoadWeights(model, resumeFrom, names);
            optimizer.Load(Path.Combine(resumeFrom, OptimizerFile));
            _state = TrainerState.Load(Path.Combine(resumeFrom, TrainerState.FileName));
            if (RankRngState() is { } rng) using (var saved = tensor(Convert.FromBase64String(rng), ScalarType.Byte)) random.set_rng_state(saved);
            resumedFrom = _state.Step;
            Log($"resumed from {resumeFrom} at step {_state.Step} (epoch {_state.Epoch}, batch {_state.BatchIndex})");
            if (ranks.IsRoot)
            {
                output.CutTrainLogAfter(_state.Step, Log);
                if (!File.Exists(Path.Combine(_out, "job.json"))) AtomicFile.WriteAllBytes(Path.Combine(_out, "job.json"), JsonSerializer.SerializeToUtf8Bytes(_job, JobJson));
            }
            if (_state.Step >= totalSteps)
            {
                Log($"the run already finished at step {_state.Step} of {totalSteps}; nothing to do (raise Training:MaxSteps or Training:Epochs to train further)");
                // A run that failed after its last checkpoint (a full disk while writing the adapter) gets its adapter now.
                if (ranks.IsRoot && !File.Exists(Path.Combine(_out, PeftAdapter.WeightsFile)) && Path.GetFullPath(resumeFrom).StartsWith(Path.GetFullPath(_out) + Path.DirectorySeparatorChar, StringComparison.Ordinal))
                {
                    PeftAdapter.Save(model, lora, _out, baseModel: modelPath);
                    Log($"wrote the run's adapter to {_out} from {resumeFrom}");
                }
                var last = _state.EvalHistory.LastOrDefault(e => e.Step == _state.Step);
                var done = Summarize(wall, sampler, data, resumedFrom, resumeFrom, last?.Loss is double l && !double.IsNaN(l) ? l : null, last?.ExactMatch, interrupted: false, last);
                ranks.Finish();
                return new Result(done, _state) { Rank = ranks.Rank };
            }
        }
        else
        {
            if (ranks.IsRoot)
            {
                Directory.CreateDirectory(_out);
                AtomicFile.WriteAllBytes(Path.Combine(_out, "job.json"), JsonSerializer.SerializeToUtf8Bytes(_job, JobJson));
            }
            if (_job.Eval.ExactMatch) _state.ExactMatchBefore = evaluator.ExactMatch("before training");
            if (evaluator.MultipleChoice("before training") is { } mcBefore)
            {
                _state.MultipleChoiceBefore = Math.Round(mcBefore.Accuracy, 6);
                _state.MultipleChoiceNormBefore = Math.Round(mcBefore.AccuracyNorm, 6);
            }
        }

        model.train();
        string? lastCheckpoint = null;
        int lastSaved = _state.Step;
        var epochBatches = schedule.Epoch(_state.Epoch);
        var stepTimer = new Stopwatch();
        bool interrupted = false;
        using (var trainLog = ranks.IsRoot ? new StreamWriter(Path.Combine(_out, "train_log.jsonl"), append: resumeFrom is not null) : new StreamWriter(Stream.Null))
        {
            trainLog.NewLine = "\n"; // JSONL with LF on every OS (Windows' WriteLine would end lines with CRLF)
            while (_state.Step < totalSteps)
            {
                if (ranks.Enabled ? _stopAgreed : _run.Cancellation.IsCancellationRequested) { interrupted = true; break; }
                stepTimer.Restart();
                var rows = new List<IReadOnlyList<TokenRow>>();
                for (int m = 0; m < t.GradientAccumulationSteps; m++)
                {
                    if (_state.BatchIndex >= epochBatches.Count)
                    {
                        _state.Epoch++;
                        _state.BatchIndex = 0;
                        epochBatches = schedule.Epoch(_state.Epoch);
                    }
                    rows.Add(epochBatches[_state.BatchIndex++].Select(i => schedule.Rows[i]).ToList());
                }
                sampler.Phase = $"step {_state.Step + 1}";
                var record = Step(model, optimizer, rows, lr.Factor(_state.Step), t);
                _state.Step++;
                stepTimer.Stop();
                _state.TrainSeconds += stepTimer.Elapsed.TotalSeconds;
                _state.TokensSeen += record.Tokens;
                _state.History.Add(record with { Step = _state.Step });
                trainLog.WriteLine(JsonSerializer.Serialize(record with { Step = _state.Step }, LineJson));
                trainLog.Flush();
                if (record.Skipped)
                {
                    _state.SkippedSteps++;
                    _state.ConsecutiveBadSteps++;
                    Log($"step {_state.Step}: non-finite loss or gradient (loss {record.Loss}, grad norm {record.GradNorm}); update skipped ({_state.ConsecutiveBadSteps} in a row)");
                    if (_state.ConsecutiveBadSteps >= t.MaxConsecutiveBadSteps)
                        throw new InvalidOperationException($"{_state.ConsecutiveBadSteps} consecutive steps had a non-finite loss or gradient; stopping. " +
                            $"The last good checkpoint is intact ({checkpoints.Latest() ?? "none yet"}); lower Training:LearningRate or check the data, then resume with --resume latest.");
                }
                else _state.ConsecutiveBadSteps = 0;
                double tps = _state.TokensSeen / Math.Max(_state.TrainSeconds, 1e-9);
                double perStep = _state.TrainSeconds / Math.Max(1, _state.Step - (resumedFrom ?? 0));
                if (ranks.IsRoot) _run.Progress?.Invoke(new TrainProgress(_state.Step, totalSteps, record.Loss, record.LearningRate, tps,
                    TimeSpan.FromSeconds(_state.TrainSeconds), TimeSpan.FromSeconds(perStep * (totalSteps - _state.Step)), sampler.Sample()));
                if (_job.Eval.EveryNSteps > 0 && _state.Step % _job.Eval.EveryNSteps == 0 && _state.Step < totalSteps)
                {
                    sampler.Phase = $"eval after step {_state.Step}";
                    _state.EvalHistory.Add(evaluator.Evaluate(_state.Step, exactMatch: false));
                }
                if (_job.Output.SaveEveryNSteps > 0 && _state.Step % _job.Output.SaveEveryNSteps == 0 && _state.Step < totalSteps)
                {
                    lastCheckpoint = SaveCheckpoint(checkpoints, model, lora, optimizer);
                    lastSaved = _state.Step;
                    previousRun?.Discard();
                }
            }
        }

        TrainSummary summary;
        if (interrupted)
        {
            if (_state.Step > lastSaved || lastCheckpoint is null && _state.Step > 0)
            {
                lastCheckpoint = SaveCheckpoint(checkpoints, model, lora, optimizer);
                previousRun?.Discard();
            }
            Log(lastCheckpoint is null
                ? "interrupted before the first step; nothing was trained or saved" + (previousRun is null ? "" : " (the previous run's results are put back)") + "; run the same command again to start"
                : $"interrupted at step {_state.Step}; checkpoint {lastCheckpoint}; continue with --resume latest");
            summary = Summarize(wall, sampler, data, resumedFrom, lastCheckpoint, null, null, interrupted: true);
        }
        else
        {
            sampler.Phase = "final eval";
            var final = evaluator.Evaluate(_state.Step, _job.Eval.ExactMatch, multipleChoice: true);
            if (final.Loss is not double.NaN) _state.EvalHistory.Add(final);
            lastCheckpoint = SaveCheckpoint(checkpoints, model, lora, optimizer);
            previousRun?.Discard(); // from here the run is resumable: a failure writing the adapter must not bring the old run back over it
            sampler.Phase = "adapter save";
            ranks.OnRoot(() => { PeftAdapter.Save(model, lora, _out, baseModel: modelPath); return null; }, "writing the adapter");
            summary = Summarize(wall, sampler, data, resumedFrom, lastCheckpoint, double.IsNaN(final.Loss) ? null : final.Loss, final.ExactMatch, interrupted: false, final);
        }
        ranks.OnRoot(() => { AtomicFile.WriteAllBytes(Path.Combine(_out, "run_summary.json"), System.Text.Encoding.UTF8.GetBytes(summary.ToJson())); return null; }, "writing run_summary.json");
        if (lastCheckpoint is not null) previousRun?.Discard();
        ranks.Finish();
        return new Result(summary, _state) { Rank = ranks.Rank };
    }

    StepRecord Step(LlamaForCausalLM model, BnbAdamW optimizer, List<IReadOnlyList<TokenRow>> microBatches, double lrFactor, TrainingSection t)
    {
        var (lossSum, total, tokens) = Backward(model, microBatches, PadId, _ranks.Shard(microBatches));
        (lossSum, _stopAgreed) = _ranks.ReduceGradients([.. optimizer.Parameters.Select(x => x.Parameter)], lossSum, _run.Cancellation.IsCancellationRequested, _state.Step + 1);
        double loss = total > 0 ? lossSum / total : double.NaN;
        double norm = GradNorm(optimizer);
        double rate = t.LearningRate * lrFactor;
        if (!double.IsFinite(loss) || !double.IsFinite(norm))
        {
            optimizer.ZeroGrad();
            return new StepRecord(0, loss, rate, norm, tokens, Skipped: true);
        }
        if (t.MaxGradNorm > 0 && norm > t.MaxGradNorm)
        {
            float coef = (float)(t.MaxGradNorm / (norm + 1e-6));
            using var noGrad = no_grad();
            foreach (var (_, p, _) in optimizer.Parameters)
            {
                using var g = p.grad;
                g?.mul_(coef).Dispose();
            }
        }
        optimizer.LearningRateScale = lrFactor;
        optimizer.Step();
        optimizer.ZeroGrad();
        return new StepRecord(0, loss, rate, norm, tokens, Skipped: false);
    }

    int PadId { get; set; }

    /// <summary>
    /// Forward and backward over the micro-batches of one optimizer step. The step's loss is the mean over every target
    /// token of all its micro-batches (not the mean of micro-batch means): each micro-batch's summed loss is divided by
    /// the step's total target count before backward, so the accumulated gradients are that mean's gradient.
    /// In data-parallel training a rank runs only <paramref name="mine"/>, its share of the step's micro-batches, still
    /// normalised by the whole step's target count. Returns the summed loss (of the micro-batches run), the step's
    /// target count and the step's tokens.
    /// </summary>
    internal static (double LossSum, long Targets, long Tokens) Backward(LlamaForCausalLM model, IReadOnlyList<IReadOnlyList<TokenRow>> microBatches, int padId,
        IReadOnlyList<IReadOnlyList<TokenRow>>? mine = null)
    {
        long total = microBatches.Sum(rows => rows.Sum(r => (long)r.ShiftedTargetCount));
        long tokens = microBatches.Sum(rows => rows.Sum(r => (long)r.InputIds.Length));
        double lossSum = 0;
        if (total == 0) return (0, 0, tokens);
        foreach (var rows in mine ?? microBatches)
        {
            using var scope = NewDisposeScope();
            using var batch = MicroBatch.Create(rows, padId, model.Device, model.SegmentAttention);
            if (batch.TargetTokens == 0) continue;
            var (sum, _) = model.Loss(batch.InputIds, batch.Labels, batch.PositionIds, batch.AttentionMask, batch.Segments);
            lossSum += sum.to(ScalarType.Float64).item<double>();
            Checkpoint.Backward(sum / total);
        }
        return (lossSum, total, tokens);
    }

    /// <summary>The L2 norm of every LoRA gradient together, in float64.</summary>
    internal static double GradNorm(BnbAdamW optimizer)
    {
        double sq = 0;
        using var noGrad = no_grad();
        foreach (var (_, p, _) in optimizer.Parameters)
        {
            using var g = p.grad;
            if (g is null) continue;
            // Every handle disposed here: a float64 copy left to the finalizer kept 8 bytes per LoRA parameter resident
            // per step until a GC ran (at r = 2048 on a hidden-256 model, +600 MB a step). One float64 copy of one
            // gradient at a time, squared in place (the planner counts it: MemoryPlanner's optimizer-step transient).
            using var d = g.to(ScalarType.Float64);
            d.mul_(d); // returns d itself
            using var n = d.sum();
            sq += n.item<double>();
        }
        return Math.Sqrt(sq);
    }

    string SaveCheckpoint(TrainingCheckpoints checkpoints, LlamaForCausalLM model, LoraOptions lora, BnbAdamW optimizer)
    {
        if (_sampler is not null) _sampler.Phase = $"checkpoint at step {_state.Step}";
        using (var rng = random.get_rng_state()) _state.RngState = Convert.ToBase64String(rng.bytes.ToArray());
        if (_ranks.Enabled)
        {
            _state.RankRngStates = [.. _ranks.AllGather(_state.RngState, $"the random states of checkpoint {_state.Step}")];
            _state.RngState = _state.RankRngStates[0];
        }
        // Every rank is here, at the same step; rank 0 writes, and every rank learns whether the checkpoint was written.
        var path = _ranks.OnRoot(() => checkpoints.Save(_state.Step, dir =>
        {
            PeftAdapter.Save(model, lora, dir, baseModel: _job.Model.Path);
            optimizer.Save(Path.Combine(dir, OptimizerFile));
            AtomicFile.WriteAllBytes(Path.Combine(dir, TrainerState.FileName), System.Text.Encoding.UTF8.GetBytes(_state.ToJson()));
        }), $"writing checkpoint {_state.Step}")!;
        Log($"checkpoint {path}");
        return path;
    }

    /// <summary>The random state this rank resumes with: its own when the checkpoint has one per rank for this many ranks, else rank 0's.</summary>
    string? RankRngState()
    {
        if (_state.RankRngStates is { } all && all.Count == _ranks.WorldSize) return all[_ranks.Rank];
        if (_ranks.Enabled || _state.RankRngStates is not null)
            Log($"the checkpoint was written by {_state.RankRngStates?.Count ?? 1} rank(s) and resumes on {_ranks.WorldSize}: data and weights continue exactly, dropout masks do not");
        return _state.RngState;
    }

    /// <summary>
    /// The checkpoint to resume from (null for a fresh run). A fresh run into a folder that holds a previous run needs
    /// Output:Overwrite; checked here, before anything is loaded, but nothing is moved yet.
    /// </summary>
    string? ChooseResume(TrainingCheckpoints checkpoints, RunOutputFolder output)
    {
        if (_run.Resume is { } resume)
        {
            if (resume.Equals("latest", StringComparison.OrdinalIgnoreCase))
            {
                return checkpoints.Latest(Log) ?? throw new InvalidOperationException(
                    $"--resume latest: no complete checkpoint in {checkpoints.Folder}; start a fresh run without --resume");
            }
            InputPaths.RequireFolder("--resume", resume, "a checkpoint folder (or 'latest')");
            var problem = TrainingCheckpoints.Verify(resume);
            if (problem is not null) throw new InvalidDataException($"--resume {resume}: {problem}; use --resume latest to take the newest complete checkpoint");
            return Path.GetFullPath(resume);
        }
        if (output.HoldsRun() && !_job.Output.Overwrite)
            throw new IOException($"Output:Dir {_out} holds a previous run; continue it with --resume latest, or start afresh with --Output:Overwrite true (its results are kept aside until the new run's first checkpoint)");
        return null;
    }

    /// <summary>The chat template a job renders instruction and chat samples with: Model:ChatTemplate, else the tokenizer's, else alpaca.</summary>
    internal static ChatTemplate ChooseTemplate(HfTokenizer tokenizer, string? name, Action<string> log)
    {
        if (name is not null) return tokenizer.GetChatTemplate(name);
        try
        {
            var template = tokenizer.GetChatTemplate();
            log(template.Format == ChatTemplateFormat.Jinja ? "chat template: the tokenizer's own, evaluated"
                : $"chat template: built-in {template.Name} (the tokenizer's template uses a construct the interpreter lacks)");
            return template;
        }
        catch (NotSupportedException e)
        {
            log($"the tokenizer has no usable chat template ({e.Message}); instruction and chat samples use the alpaca format (set Model:ChatTemplate to choose)");
            return tokenizer.GetChatTemplate("alpaca");
        }
    }

    sealed record PreparedData(SampleEncoder Encoder, List<TokenRow> TrainRows, List<TokenRow> EvalRows, List<TrainingSample> EvalSamples,
        int Truncated, int SkippedLines, IReadOnlyList<MultipleChoiceItem>? Choices);

    /// <summary>The one sample format Data:Format asks for, or null for per-line detection (auto).</summary>
    internal static SampleFormat? FormatOf(DataSection d) => d.Format.ToLowerInvariant() switch
    {
        "text" => SampleFormat.Text, "instruction" => SampleFormat.Instruction, "chat" => SampleFormat.Chat, _ => null,
    };

    /// <summary>Multiple-choice items are asked as plain text (no chat template) when the job's samples are plain text.</summary>
    internal static bool ChoicesAsText(TrainJob job) => job.Data.Format.Equals("text", StringComparison.OrdinalIgnoreCase);

    /// <summary>
    /// Samples as the job's token rows: encoded (truncated to Data:MaxSeqLength), those without a target token left
    /// dropped, then packed or one per row as Data:Packing says. The training data and every evaluation go through here.
    /// </summary>
    internal static List<TokenRow> EncodeRows(IEnumerable<TrainingSample> samples, SampleEncoder encoder, DataSection d, ref int truncated, ref int cut,
        ref int empty, out long tokens)
    {
        var list = new List<EncodedSample>();
        foreach (var s in samples)
        {
            var e = encoder.Encode(s);
            if (e.Truncated) truncated++;
            if (e.CutBeforeTokenizing) cut++;
            if (e.Labels.Skip(1).All(l => l == EncodedSample.CausalLmLossIgnore)) { empty++; continue; }
            list.Add(e);
        }
        tokens = list.Sum(e => (long)e.InputIds.Length);
        return d.Packing ? SequencePacker.Pack(list, d.MaxSeqLength) : [.. list.Select(TokenRow.Single)];
    }

    PreparedData PrepareData(HfTokenizer tokenizer, ChatTemplate template)
    {
        var d = _job.Data;
        var format = FormatOf(d);
        bool skip = d.MalformedLines.Equals("skip", StringComparison.OrdinalIgnoreCase);
        InputPaths.RequireFile("Data:TrainFile", d.TrainFile!, "a JSONL file");
        if (d.EvalFile is { } ef) InputPaths.RequireFile("Data:EvalFile", ef, "a JSONL file");
        // A line costs its bytes and strings (at most JsonlDataset.DefaultMaxLineBytes); its text is cut to what
        // Data:MaxSeqLength tokens can cover before it is tokenized (SampleEncoder.MaxTextChars).
        var train = JsonlDataset.Read(d.TrainFile!, format, skip);
        var trainSamples = train.Samples.ToList();
        var evalSamples = new List<TrainingSample>();
        int skipped = train.SkippedLines;
        if (train.FirstSkipped is { } firstBad) Log($"skipped {train.SkippedLines} malformed line(s) in {d.TrainFile}; first: {firstBad}");
        if (d.EvalFile is { } evalFile)
        {
            var eval = JsonlDataset.Read(evalFile, format, skip);
            evalSamples = [.. eval.Samples];
            skipped += eval.SkippedLines;
            if (eval.FirstSkipped is { } firstEvalBad) Log($"skipped {eval.SkippedLines} malformed line(s) in {evalFile}; first: {firstEvalBad}");
        }
        else if (d.EvalFraction > 0 && trainSamples.Count >= 2)
        {
            var order = Enumerable.Range(0, trainSamples.Count).ToArray();
            new Random(_job.Training.Seed).Shuffle(order);
            int n = Math.Clamp((int)Math.Round(trainSamples.Count * d.EvalFraction), 1, trainSamples.Count - 1);
            var held = order.Take(n).Order().ToHashSet();
            evalSamples = [.. held.Select(i => trainSamples[i])];
            trainSamples = [.. Enumerable.Range(0, trainSamples.Count).Where(i => !held.Contains(i)).Select(i => trainSamples[i])];
        }
        var encoder = new SampleEncoder(tokenizer, template, d.MaxSeqLength, d.TrainOnPrompt);
        int truncated = 0, cut = 0, empty = 0;
        var trainRows = EncodeRows(trainSamples, encoder, d, ref truncated, ref cut, ref empty, out long trainTokens);
        var evalRows = EncodeRows(evalSamples, encoder, d, ref truncated, ref cut, ref empty, out _);
        if (trainRows.Count == 0) throw new InvalidOperationException($"{d.TrainFile}: no sample has a target token left after truncation to {d.MaxSeqLength} tokens");
        PadId = PadIdOf(tokenizer);
        IReadOnlyList<MultipleChoiceItem>? choices = _job.Eval.ChoicesFile is { } cf ? MultipleChoiceItem.Read(cf) : null;
        Log($"data: {trainSamples.Count} train / {evalSamples.Count} eval samples, {trainTokens:N0} train tokens in {trainRows.Count} rows of ≤ {d.MaxSeqLength} ({(d.Packing ? "packed" : "padded, length-grouped")}); " +
            $"{truncated} truncated{(cut > 0 ? $" ({cut} of them longer than {encoder.MaxTextChars:N0} characters, cut to that before tokenizing)" : "")}, {empty} without target tokens dropped, {skipped} malformed lines skipped");
        if (choices is not null) Log($"multiple choice: {choices.Count} items from {_job.Eval.ChoicesFile}");
        return new PreparedData(encoder, trainRows, evalRows, evalSamples, truncated, skipped, choices);
    }

    /// <summary>The id padding rows use: the tokenizer's pad token, else EOS, else 0 (never a target).</summary>
    internal static int PadIdOf(HfTokenizer tokenizer) => tokenizer.PadTokenId ?? tokenizer.EosTokenId ?? 0;

    TrainSummary Summarize(Stopwatch wall, PeakMemorySampler sampler, PreparedData data, int? resumedFrom, string? checkpoint,
        double? evalLoss, double? exactAfter, bool interrupted, EvalRecord? final = null)
    {
        var recent = _state.History.Where(h => !h.Skipped).TakeLast(10).ToList();
        sampler.Sample();
        return new TrainSummary
        {
            Steps = _state.Step,
            TrainLoss = recent.Count > 0 ? Math.Round(recent.Average(h => h.Loss), 6) : null,
            EvalLoss = evalLoss is double l ? Math.Round(l, 6) : null,
            EvalPerplexity = evalLoss is double l2 ? Math.Round(Math.Exp(l2), 4) : null,
            TokensPerSecond = Math.Round(_state.TokensSeen / Math.Max(_state.TrainSeconds, 1e-9), 1),
            PeakMemoryBytes = sampler.ReportedPeakBytes,
            PeakMemoryPhase = sampler.PeakPhase,
            WallSeconds = Math.Round(wall.Elapsed.TotalSeconds, 2),
            OutputDir = _out,
            ExactMatchBefore = _state.ExactMatchBefore,
            ExactMatchAfter = exactAfter,
            ExactMatchSamples = _job.Eval.ExactMatch ? Evaluation.ExactMatchCount(data.EvalSamples, _job.Eval) : null,
            MultipleChoiceBefore = _state.MultipleChoiceBefore,
            MultipleChoiceNormBefore = _state.MultipleChoiceNormBefore,
            MultipleChoiceAfter = final?.MultipleChoiceAccuracy,
            MultipleChoiceNormAfter = final?.MultipleChoiceAccuracyNorm,
            MultipleChoiceItems = data.Choices?.Count,
            SkippedSteps = _state.SkippedSteps,
            TruncatedSamples = data.Truncated,
            SkippedLines = data.SkippedLines,
            Tokens = _state.TokensSeen,
            Interrupted = interrupted,
            ResumedFromStep = resumedFrom,
            Checkpoint = checkpoint,
            Config = JsonSerializer.SerializeToNode(_job, JobJson),
        };
    }

    static readonly JsonSerializerOptions JobJson = new() { WriteIndented = true, NewLine = "\n" };
    static readonly JsonSerializerOptions LineJson = new() { NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals };

    /// <summary>How a job loads its base model: compute dtype, quantization (or none), streaming, device.</summary>
    public static HfModelLoader.Options LoaderOptionsOf(TrainJob job, Device? device = null) => new()
    {
        ComputeDType = ParseDType(job.Model.ComputeDType),
        Quantize = job.Quantization.QuantizesBase,
        Blocksize = job.Quantization.Blocksize,
        QuantType = job.Quantization.QuantizesBase ? QuantTypes.Parse(job.Quantization.QuantType) : QuantType.Nf4,
        DoubleQuant = job.Quantization.DoubleQuant,
        Streaming = job.Model.Stream,
        StreamWindow = job.Model.StreamWindow,
        NonFinite = NonFiniteValues.ParsePolicy(job.Model.NonFiniteWeights),
        Device = device,
    };

    /// <summary>The memory planner's view of a job: its shapes, precision, optimizer and budget.</summary>
    public static PlanOptions PlanOptionsOf(TrainJob job) => new()
    {
        SequenceLength = job.Data.MaxSeqLength,
        MicroBatch = job.Training.MicroBatchSize,
        LoraRank = Math.Max(job.Lora.Rank, job.Lora.RankPattern?.Values.DefaultIfEmpty().Max() ?? 0), // an upper bound with rank_pattern
        LoraTargets = PlannedTargets(LoraOptionsOf(job.Lora)),
        UseDora = job.Lora.UseDora,
        LoraDropout = job.Lora.Dropout,
        AdapterDType = ParseDType(job.Lora.DType),
        QuantizeBase = job.Quantization.QuantizesBase,
        QuantBlocksize = job.Quantization.Blocksize,
        DoubleQuant = job.Quantization.DoubleQuant,
        ComputeDType = ParseDType(job.Model.ComputeDType),
        GradientCheckpointing = job.Training.GradientCheckpointing,
        OffloadCheckpoints = job.Training.OffloadCheckpoints,
        MlpTileTokens = job.Training.MlpTileTokens,
        NormTileTokens = job.Training.NormTileTokens,
        AttentionByGroup = job.Training.AttentionByGroup,
        OptimizerBits = job.Training.Optimizer.Equals("adamw8bit", StringComparison.OrdinalIgnoreCase) ? 8 : 32,
        PagedOptimizer = job.Training.PagedOptimizer,
        LossChunkTokens = job.Training.LossChunkTokens,
        AttentionMask = job.Data.Packing && !job.Training.SegmentAttention,
        SegmentAttention = job.Data.Packing && job.Training.SegmentAttention,
        LayerStreaming = job.Model.Stream,
        StreamingWindow = job.Model.StreamWindow,
        BudgetBytes = job.Memory.BudgetBytes,
    };

    // The projection kinds a job may adapt, for the planner: those a target name (plain or dotted) ends with; every
    // kind for a regex. An upper bound where exclusions or layer choices adapt fewer.
    static IReadOnlyList<string> PlannedTargets(LoraOptions o) => o.TargetRegex is not null ? LoraOptions.AllLinear
        : LoraOptions.AllLinear.Where(p => o.TargetModules.Any(t => t == p || t.EndsWith("." + p, StringComparison.Ordinal))).ToList();

    /// <summary>PEFT-style LoRA options from the job's section.</summary>
    public static LoraOptions LoraOptionsOf(LoraSection s) => new()
    {
        Rank = s.Rank,
        Alpha = s.Alpha,
        Dropout = s.Dropout,
        UseRsLora = s.UseRsLora,
        UseDora = s.UseDora,
        TargetModules = s.TargetModules is { } m ? [.. m] : LoraOptions.AllLinear,
        TargetRegex = s.TargetRegex,
        ExcludeModules = s.ExcludeModules,
        LayersToTransform = s.LayersToTransform,
        RankPattern = s.RankPattern?.ToList() ?? [],
        AlphaPattern = s.AlphaPattern?.ToList() ?? [],
        Init = s.Init,
        DType = ParseDType(s.DType),
    };

    // The job's values are already validated against bfloat16/float16/float32.
    static ScalarType ParseDType(string name) => TorchDTypes.ToScalarType(FloatTypes.Parse(name));
}
