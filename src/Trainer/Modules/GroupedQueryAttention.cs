using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Causal grouped-query attention a key/value group at a time, with no repeated K/V heads: each group's query heads
/// attend to their one K/V head expanded (a view, no copy). As an autograd node it saves only q, k and v at their own
/// widths and recomputes each group's attention in backward, so neither the repeated K/V heads (two query-sized
/// tensors) nor the attention output is kept for backward, and the K/V gradients never exist at query width. The cost is
/// one more attention forward per layer in backward; the output equals SDPA over repeated heads, the K/V gradients
/// agree up to the order in which each group's per-head gradients are summed.
/// </summary>
public static class GroupedQueryAttention
{
    /// <summary>Causal attention of q [B, heads, T, d] over k, v [B, kvHeads, T, d] (heads a multiple of kvHeads; SDPA's scaling by 1/√d).</summary>
    public static Tensor Apply(Tensor q, Tensor k, Tensor v)
    {
        if (q.shape[1] % k.shape[1] != 0) throw new ArgumentException($"{q.shape[1]} query heads do not split into groups of {k.shape[1]} key/value heads");
        if (is_grad_enabled() && (q.requires_grad || k.requires_grad || v.requires_grad)) return GroupedAttentionFunction.apply(q, k, v)[0];
        return Forward(q, k, v);
    }

    // Each group's attention into one output.
    private static Tensor Forward(Tensor q, Tensor k, Tensor v)
    {
        using var scope = NewDisposeScope();
        long groups = k.shape[1], rep = q.shape[1] / groups;
        var output = empty_like(q);
        for (long g = 0; g < groups; g++)
        {
            using var groupScope = NewDisposeScope();
            var (qg, kg, vg) = (q.narrow(1, g * rep, rep), Expanded(k, g, rep), Expanded(v, g, rep));
            output.narrow(1, g * rep, rep).copy_(nn.functional.scaled_dot_product_attention(qg, kg, vg, is_casual: true));
        }
        return output.MoveToOuterDisposeScope();
    }

    private static Tensor Expanded(Tensor kv, long group, long rep)
    {
        using var head = kv.narrow(1, group, 1);
        return head.expand(kv.shape[0], rep, kv.shape[2], kv.shape[3]);
    }

    private sealed class GroupedAttentionFunction : torch.autograd.MultiTensorFunction<GroupedAttentionFunction>
    {
        public override string Name => "GroupedQueryAttentionBackward";

        public override List<Tensor> forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            var (q, k, v) = ((Tensor)vars[0], (Tensor)vars[1], (Tensor)vars[2]);
            ctx.set_materialize_grads(false); // as Linear4bit: no cached output is touched in backward
            ctx.save_data("thread", Environment.CurrentManagedThreadId);
            ctx.save_for_backward([q, k, v]);
            return [Forward(q, k, v)];
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, List<Tensor> grads)
        {
            ReturnedGradients.Release();
            var grad = grads[0];
            if (grad is null || grad.IsInvalid) return [null!, null!, null!];
            try
            {
                var saved = ctx.get_saved_variables();
                var (q, k, v) = (saved[0], saved[1], saved[2]);
                using var scope = NewDisposeScope();
                long groups = k.shape[1], rep = q.shape[1] / groups;
                var (gq, gk, gv) = (empty_like(q), empty_like(k), empty_like(v));
                for (long g = 0; g < groups; g++)
                {
                    using var groupScope = NewDisposeScope();
                    using var _ = enable_grad();
                    var qg = q.narrow(1, g * rep, rep).detach().requires_grad_(true);
                    var kg = k.narrow(1, g, 1).detach().requires_grad_(true);
                    var vg = v.narrow(1, g, 1).detach().requires_grad_(true);
                    var og = nn.functional.scaled_dot_product_attention(qg, kg.expand(k.shape[0], rep, k.shape[2], k.shape[3]),
                        vg.expand(v.shape[0], rep, v.shape[2], v.shape[3]), is_casual: true);
                    torch.autograd.backward([og], [grad.narrow(1, g * rep, rep)]);
                    gq.narrow(1, g * rep, rep).copy_(qg.grad!);
                    gk.narrow(1, g, 1).copy_(kg.grad!);
                    gv.narrow(1, g, 1).copy_(vg.grad!);
                }
                var result = new List<Tensor> { gq.MoveToOuterDisposeScope(), gk.MoveToOuterDisposeScope(), gv.MoveToOuterDisposeScope() };
                grad.Dispose(); // our handles: autograd keeps what it still needs
                foreach (var t in saved) t.Dispose();
                ctx.Dispose(); // q, k and v: TorchSharp's node would keep them until it goes (inside a checkpoint: the layer's whole backward)
                return ReturnedGradients.Keep(result);
            }
            catch (Exception e)
            {
                Checkpoint.RecordFailure(e, ctx.get_data("thread") as int?);
                return [null!, null!, null!];
            }
        }
    }
}
