using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Reentrant gradient checkpointing: forward runs a block without keeping its activations (only its input); backward
/// restores the CPU RNG state (so dropout draws the same mask), recomputes the block with grad enabled and
/// back-propagates through it. An exception in the recompute cannot cross the native callback: it is stored and
/// rethrown by <see cref="Backward"/> once the backward pass returns.
/// </summary>
public static class Checkpoint
{
    [ThreadStatic] private static Exception? _failure;

    /// <summary>
    /// <paramref name="block"/>(<paramref name="input"/>, <paramref name="constants"/>), checkpointed when grad is enabled
    /// and the input requires grad (make the first block's input require grad: a frozen embedding's output does not).
    /// Every tensor the block reads besides its input and module weights must come through <paramref name="constants"/>
    /// (they are saved with the node; tensors captured by the closure may be disposed before backward runs).
    /// </summary>
    public static Tensor Run(Func<Tensor, IReadOnlyList<Tensor>, Tensor> block, Tensor input, params Tensor[] constants)
    {
        if (!is_grad_enabled() || !input.requires_grad) return block(input, constants);
        return CheckpointFunction.apply(input, block, constants);
    }

    /// <summary>Runs <c>loss.backward()</c> and rethrows any exception raised inside a checkpointed recompute.</summary>
    public static void Backward(Tensor loss)
    {
        _failure = null;
        loss.backward();
        var failure = _failure;
        _failure = null;
        if (failure is not null) throw new InvalidOperationException($"the backward recompute of a checkpointed block failed: {failure.Message}", failure);
    }

    private sealed class CheckpointFunction : torch.autograd.SingleTensorFunction<CheckpointFunction>
    {
        public override string Name => "CheckpointBackward";

        public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            var input = (Tensor)vars[0];
            var block = (Func<Tensor, IReadOnlyList<Tensor>, Tensor>)vars[1];
            var constants = (Tensor[])vars[2];
            ctx.set_materialize_grads(false); // see Linear4bit: no cached output is touched in backward
            ctx.save_data("block", block);
            using (var state = torch.random.get_rng_state()) ctx.save_data("rng", state.bytes.ToArray()); // bytes: no tensor outlives its scope
            ctx.save_for_backward([input, .. constants]);
            return block(input, constants);
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
        {
            if (grad.IsInvalid) return [null!, null!, null!];
            try
            {
                var saved_ = ctx.get_saved_variables();
                var input = saved_[0];
                var constants = saved_.Skip(1).ToArray();
                var block = (Func<Tensor, IReadOnlyList<Tensor>, Tensor>)ctx.get_data("block");
                using var saved = tensor((byte[])ctx.get_data("rng"), ScalarType.Byte);
                using var current = torch.random.get_rng_state();
                torch.random.set_rng_state(saved);
                Tensor? inputGrad;
                using (var scope = NewDisposeScope())
                using (enable_grad())
                {
                    var x = input.detach().requires_grad_(true);
                    var y = block(x, constants);
                    torch.autograd.backward([y], [grad]);
                    inputGrad = x.grad?.detach().MoveToOuterDisposeScope();
                }
                torch.random.set_rng_state(current);
                return [inputGrad!, null!, null!];
            }
            catch (Exception e)
            {
                _failure ??= e;
                return [null!, null!, null!];
            }
        }
    }
}
