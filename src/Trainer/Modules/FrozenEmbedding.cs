using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// A frozen token embedding (HF: <c>embed_tokens.weight</c> [vocab, hidden]): a row lookup, no gradient. The table is
/// either a registered parameter on the compute device, or kept in host memory (<see cref="OnHost"/>: on the CPU
/// backend the memory-mapped checkpoint itself), in which case only the rows a batch uses are gathered, converted to the
/// compute dtype and moved to the ids' device: a Llama 3 table (1 GB in bf16) then costs the device nothing. A model
/// whose lm_head is tied to the embedding needs the table on the device for the head's matmul, and keeps it there.
/// </summary>
public sealed class FrozenEmbedding : nn.Module<Tensor, Tensor>
{
    private readonly Tensor? _host;
    private readonly ScalarType _computeDType;

    /// <summary>Wraps a [vocab, hidden] matrix as a device parameter.</summary>
    public FrozenEmbedding(Tensor weight) : base("Embedding")
    {
        register_parameter("weight", new Parameter(weight.detach(), requires_grad: false));
        _computeDType = weight.dtype;
    }

    private FrozenEmbedding(Tensor host, ScalarType computeDType) : base("Embedding")
    {
        _host = host;
        _computeDType = computeDType;
    }

    /// <summary>
    /// An embedding whose [vocab, hidden] <paramref name="table"/> stays in host memory (taken over: disposed with the
    /// module; any float dtype); rows are converted to <paramref name="computeDType"/> as they are looked up.
    /// </summary>
    public static FrozenEmbedding OnHost(Tensor table, ScalarType computeDType) => new(table, computeDType);

    /// <summary>True when the table stays in host memory and only looked-up rows reach the device.</summary>
    public bool IsOnHost => _host is not null;

    /// <summary>
    /// The matrix as a device parameter (looked up by name: Module.to() replaces registered tensors, through this setter,
    /// as in <see cref="FrozenWeightModule"/>).
    /// </summary>
    public Parameter weight
    {
        get => get_parameter("weight")
            ?? throw new InvalidOperationException("the embedding table stays in host memory (FrozenEmbedding.OnHost); use Table");
        private set
        {
            var old = get_parameter("weight");
            ConditionallyRegisterParameter("weight", value);
            if (old is not null && !ReferenceEquals(old, value)) old.Dispose();
        }
    }

    /// <summary>The table wherever it is held (host or device).</summary>
    public Tensor Table => _host ?? weight;

    /// <summary>Rows of the table for token ids of any shape; result shape = ids shape + [hidden], on the ids' device.</summary>
    public override Tensor forward(Tensor ids)
    {
        var table = Table;
        long vocab = table.shape[0];
        using var scope = NewDisposeScope();
        var flat = ids.reshape(-1);
        if (flat.numel() > 0)
        {
            long max = flat.max().item<long>(), min = flat.min().item<long>();
            if (min < 0 || max >= vocab) throw new ArgumentOutOfRangeException(nameof(ids), $"token id {(min < 0 ? min : max)} is outside the vocabulary of {vocab}");
        }
        Tensor rows;
        if (_host is null) rows = table.index_select(0, flat);
        else
        {
            rows = _host.index_select(0, flat.to(_host.device));
            if (rows.dtype != _computeDType) rows = rows.to(_computeDType);
            rows = rows.to(ids.device); // no copy when the ids are on the host too (the CPU backend)
        }
        var shape = ids.shape.Append(table.shape[1]).ToArray();
        return rows.view(shape).MoveToOuterDisposeScope();
    }

    /// <inheritdoc />
    protected override void Dispose(bool disposing)
    {
        if (disposing) _host?.Dispose();
        base.Dispose(disposing);
    }
}
