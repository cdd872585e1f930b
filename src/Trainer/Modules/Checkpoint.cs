using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Reentrant gradient checkpointing: forward runs a block without keeping its activations (only its input); backward
/// restores the CPU RNG state (so dropout draws the same mask; a block that reseeds its device's generator itself
/// opts out), recomputes the block with grad enabled and
/// back-propagates through it. An exception in the recompute cannot cross the native callback: it is stored and
/// rethrown by <see cref="Backward"/> once the backward pass returns.
/// </summary>
public static class Checkpoint
{
    [ThreadStatic] private static Exception? _failure;
    // The input gradient the last recompute returned: autograd has taken its own reference by the time the next
    // checkpoint's backward runs, so our handle is dropped then (otherwise every layer's gradient handle would stay in
    // the dispose scope around the backward call, holding its storage, until the step ends).
    [ThreadStatic] private static Tensor? _returned;
    // On CUDA, libtorch runs backward on its own device threads: a failure there is filed under the thread that ran
    // the forward (and so calls Backward), since the thread-static above is not visible across threads.
    private static readonly System.Collections.Concurrent.ConcurrentDictionary<int, Exception> OtherThreadFailures = new();

    // The function's fourth argument: where the input is kept, and whether the CPU generator is saved for the recompute.
    private sealed record Settings(ActivationOffload? Offload, bool PreserveRngState);

    /// <summary>
    /// <paramref name="block"/>(<paramref name="input"/>, <paramref name="constants"/>), checkpointed when grad is enabled
    /// and the input requires grad (make the first block's input require grad: a frozen embedding's output does not).
    /// Every tensor the block reads besides its input and module weights must come through <paramref name="constants"/>
    /// (they are saved with the node; tensors captured by the closure may be disposed before backward runs).
    /// </summary>
    public static Tensor Run(Func<Tensor, IReadOnlyList<Tensor>, Tensor> block, Tensor input, params Tensor[] constants) =>
        Run(block, input, null, preserveRngState: true, constants);

    /// <summary>
    /// As <see cref="Run(Func{Tensor, IReadOnlyList{Tensor}, Tensor}, Tensor, Tensor[])"/>; with
    /// <paramref name="preserveRngState"/> false (PyTorch's <c>preserve_rng_state=False</c>) the CPU generator's state is
    /// not saved and restored around the recompute: for a block that reseeds its generator itself (the CUDA path, whose
    /// generator state TorchSharp cannot save).
    /// </summary>
    public static Tensor Run(Func<Tensor, IReadOnlyList<Tensor>, Tensor> block, Tensor input, bool preserveRngState, params Tensor[] constants) =>
        Run(block, input, null, preserveRngState, constants);

    /// <summary>
    /// As <see cref="Run(Func{Tensor, IReadOnlyList{Tensor}, Tensor}, Tensor, bool, Tensor[])"/>; with <paramref name="offload"/>
    /// the input is not kept in device memory but copied to <paramref name="offload"/>'s host memory after the forward and
    /// fetched back for the recompute (the caller may then free the input; the results are bit-identical).
    /// </summary>
    public static Tensor Run(Func<Tensor, IReadOnlyList<Tensor>, Tensor> block, Tensor input, ActivationOffload? offload, bool preserveRngState,
        params Tensor[] constants)
    {
        if (!is_grad_enabled() || !input.requires_grad) return block(input, constants);
        return CheckpointFunction.apply(input, block, constants, new Settings(offload, preserveRngState));
    }

    /// <summary>Runs <c>loss.backward()</c> and rethrows any exception raised inside a checkpointed recompute.</summary>
    public static void Backward(Tensor loss)
    {
        _failure = null;
        OtherThreadFailures.TryRemove(Environment.CurrentManagedThreadId, out _);
        try
        {
            loss.backward();
        }
        finally
        {
            _returned?.Dispose();
            _returned = null;
        }
        var failure = _failure;
        _failure = null;
        if (OtherThreadFailures.TryRemove(Environment.CurrentManagedThreadId, out var other)) failure ??= other;
        if (failure is not null) throw new InvalidOperationException($"the backward recompute of a checkpointed block failed: {failure.Message}", failure);
    }

    /// <summary>
    /// Files an exception raised inside a native backward callback (it must not cross it) for <see cref="Backward"/> to
    /// rethrow; <paramref name="ownerThread"/> is the managed thread that ran the node's forward, when known.
    /// </summary>
    internal static void RecordFailure(Exception e, int? ownerThread)
    {
        if (ownerThread is int owner && owner != Environment.CurrentManagedThreadId) OtherThreadFailures.TryAdd(owner, e);
        else _failure ??= e;
    }

    private sealed class CheckpointFunction : torch.autograd.SingleTensorFunction<CheckpointFunction>
    {
        public override string Name => "CheckpointBackward";

        public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            var input = (Tensor)vars[0];
            var block = (Func<Tensor, IReadOnlyList<Tensor>, Tensor>)vars[1];
            var constants = (Tensor[])vars[2];
            var settings = (Settings)vars[3];
            var offload = settings.Offload;
            ctx.set_materialize_grads(false); // see Linear4bit: no cached output is touched in backward
            ctx.save_data("block", block);
            ctx.save_data("thread", Environment.CurrentManagedThreadId);
            if (settings.PreserveRngState)
                using (var state = torch.random.get_rng_state()) ctx.save_data("rng", state.bytes.ToArray()); // bytes: no tensor outlives its scope
            ctx.save_data("offload", (object?)offload ?? "no offload"); // a placeholder: no null data
            ctx.save_data("slot", offload?.Store(input) ?? -1);
            ctx.save_for_backward(offload is null ? [input, .. constants] : [.. constants]);
            return block(input, constants);
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
        {
            if (grad.IsInvalid) return [null!, null!, null!, null!];
            _returned?.Dispose();
            _returned = null;
            try
            {
                var saved_ = ctx.get_saved_variables();
                var offload = ctx.get_data("offload") as ActivationOffload;
                using var fetched = offload?.Fetch((int)ctx.get_data("slot"));
                var input = fetched ?? saved_[0];
                var constants = saved_.Skip(fetched is null ? 1 : 0).ToArray();
                var block = (Func<Tensor, IReadOnlyList<Tensor>, Tensor>)ctx.get_data("block");
                var rng = ctx.get_data("rng") as byte[];
                using var saved = rng is null ? null : tensor(rng, ScalarType.Byte);
                using var current = rng is null ? null : torch.random.get_rng_state();
                if (saved is not null) torch.random.set_rng_state(saved);
                Tensor? inputGrad;
                using (var scope = NewDisposeScope())
                using (enable_grad())
                {
                    var x = input.detach().requires_grad_(true);
                    var y = block(x, constants);
                    torch.autograd.backward([y], [grad]);
                    inputGrad = x.grad?.detach().MoveToOuterDisposeScope();
                }
                if (current is not null) torch.random.set_rng_state(current);
                grad.Dispose(); // our handle on the output gradient: autograd keeps what it still needs
                foreach (var t in saved_) t.Dispose();
                ctx.Dispose(); // the saved input (without offloading): TorchSharp's node would keep it until the whole backward ends
                _returned = inputGrad;
                return [inputGrad!, null!, null!, null!];
            }
            catch (Exception e)
            {
                RecordFailure(e, ctx.get_data("thread") as int?);
                return [null!, null!, null!, null!];
            }
        }
    }
}
