using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// A base model folder (dense or bnb-4bit) with an optional PEFT LoRA adapter merged in, read one tensor at a time:
/// <see cref="Float32"/> dequantizes a 4-bit weight and adds <c>scaling·B·A</c> where the adapter targets it (a DoRA
/// adapter then rescales each row: <c>m / ‖W + scaling·B·A‖ · (W + scaling·B·A)</c>, PEFT's merge), so a
/// writer (a merged Hugging Face folder, a GGUF file) holds one tensor at a time and memory stays bounded by the
/// largest. Non-float tensors are handed out as their raw bytes.
/// </summary>
public sealed class MergedWeights : IDisposable
{
    private readonly SafetensorsReader? _adapter;
    private readonly SafetensorsModelWeights _weights;
    private readonly Dictionary<string, string> _deltas; // weight key -> module

    private MergedWeights(SafetensorsCheckpoint checkpoint, SafetensorsReader? adapter, Dictionary<string, string> deltas, LoraOptions? options)
    {
        Checkpoint = checkpoint;
        _adapter = adapter;
        _weights = new SafetensorsModelWeights(checkpoint);
        _deltas = deltas;
        Options = options;
        Names = checkpoint.Tensors.Select(t => t.Name).Where(n => !BnbCheckpointLayout.IsAuxiliaryKey(n)).ToList();
    }

    /// <summary>The base checkpoint.</summary>
    public SafetensorsCheckpoint Checkpoint { get; }

    /// <summary>The model's tensor names (bnb-4bit auxiliary entries left out), in checkpoint order.</summary>
    public IReadOnlyList<string> Names { get; }

    /// <summary>The adapter's settings (null without an adapter); each module merges with its own <c>ForModule</c> scaling (rank_pattern / alpha_pattern).</summary>
    public LoraOptions? Options { get; }

    /// <summary>How many weights the adapter changes.</summary>
    public int AdaptedCount => _deltas.Count;

    /// <summary>Opens <paramref name="baseFolder"/> and, if given, <paramref name="adapterFolder"/>, checking that every adapted module exists in the base.</summary>
    public static MergedWeights Open(string baseFolder, string? adapterFolder)
    {
        SafetensorsReader? adapter = null;
        var deltas = new Dictionary<string, string>(StringComparer.Ordinal);
        LoraOptions? options = null;
        if (adapterFolder is not null)
        {
            options = PeftAdapter.ReadOptions(adapterFolder);
            var adapterPath = Path.Combine(adapterFolder, PeftAdapter.WeightsFile);
            if (!File.Exists(adapterPath)) throw new FileNotFoundException($"{adapterFolder}: no {PeftAdapter.WeightsFile}", adapterPath);
            adapter = SafetensorsReader.Open(adapterPath);
        }
        SafetensorsCheckpoint checkpoint;
        try { checkpoint = SafetensorsCheckpoint.Open(baseFolder); }
        catch
        {
            adapter?.Dispose();
            throw;
        }
        try
        {
            if (adapter is not null)
            {
                var weights = new SafetensorsModelWeights(checkpoint);
                var projections = AdapterCheck.Projections(checkpoint);
                AdapterCheck.Verify(adapter.Path, options!, projections); // every tensor, shape and value, before anything is written
                foreach (var t in adapter.Tensors)
                {
                    if (PeftAdapter.ModuleOfLoraA(t.Name) is not { } module) continue;
                    if (!weights.Contains(module + ".weight"))
                        throw new InvalidDataException($"{adapter.Path}: {t.Name} targets {module}, which the base model does not have");
                    deltas[module + ".weight"] = module;
                }
                if (deltas.Count == 0) throw new InvalidDataException($"{adapter.Path}: no lora_A/lora_B tensors");
            }
            return new MergedWeights(checkpoint, adapter, deltas, options);
        }
        catch
        {
            adapter?.Dispose();
            checkpoint.Dispose();
            throw;
        }
    }

    /// <summary>The logical shape of a tensor (a 4-bit weight's unpacked shape).</summary>
    public long[] Shape(string name) => _weights.Shape(name);

    /// <summary>True for floating-point tensors (4-bit weights included), which <see cref="Float32"/> reads.</summary>
    public bool IsFloating(string name) =>
        BnbCheckpointLayout.IsQuantized(Checkpoint, name) || FloatTypes.FromTensorDType(Checkpoint.GetInfo(name).DType) is not null;

    /// <summary>True when the adapter changes <paramref name="name"/>.</summary>
    public bool IsAdapted(string name) => _deltas.ContainsKey(name);

    /// <summary>
    /// A floating-point tensor as float32 on the CPU, dequantized and with the adapter's delta added where it has one.
    /// The caller disposes it (or reads it inside a dispose scope).
    /// </summary>
    public Tensor Float32(string name)
    {
        Tensor w;
        if (BnbCheckpointLayout.IsQuantized(Checkpoint, name))
        {
            // As PEFT merges a bnb layer: dequantize_4bit gives quant_state.dtype (usually bf16), then the delta is added in float32.
            var q = BnbCheckpointLayout.Read(Checkpoint, name);
            using var stored = empty(q.State.Shape, dtype: TorchDTypes.ToScalarType(q.State.DType));
            FourBitDequantizer.Dequantize(q, q.State.DType, stored.bytes);
            w = stored.to(ScalarType.Float32, copy: true);
        }
        else if (FloatTypes.FromTensorDType(Checkpoint.GetInfo(name).DType) is not null)
        {
            using var dense = _weights.Dense(name);
            w = dense.to(ScalarType.Float32, copy: true);
        }
        else throw new ArgumentException($"{name} is not a floating-point tensor", nameof(name));
        if (!_deltas.TryGetValue(name, out var module)) return w;
        using var scope = NewDisposeScope();
        var a = ReadAdapter(PeftAdapter.LoraAKey(module));
        var b = ReadAdapter(PeftAdapter.LoraBKey(module));
        if (a.shape[0] != b.shape[1] || b.shape[0] != w.shape[0] || a.shape[1] != w.shape[1])
            throw new InvalidDataException($"{_adapter!.Path}: {module} has A [{string.Join(", ", a.shape)}] and B [{string.Join(", ", b.shape)}], which do not fit the base weight [{string.Join(", ", w.shape)}]");
        var own = Options!.ForModule(module); // rank_pattern / alpha_pattern
        if (a.shape[0] != own.Rank)
            throw new InvalidDataException($"{_adapter!.Path}: {module} has rank {a.shape[0]}, adapter_config.json gives it rank {own.Rank} (r / rank_pattern)");
        var merged = w + b.matmul(a) * own.Scaling;
        w.Dispose();
        if (own.UseDora)
        {
            var m = ReadAdapter(PeftAdapter.MagnitudeKey(module));
            if (m.dim() != 1 || m.shape[0] != merged.shape[0])
                throw new InvalidDataException($"{_adapter!.Path}: {module}{PeftAdapter.MagnitudeSuffix} has shape [{string.Join(", ", m.shape)}], the base weight needs [{merged.shape[0]}]");
            var norm = linalg.vector_norm(merged, 2, [1], false);
            merged.mul_((m / norm).unsqueeze(1));
        }
        return merged.MoveToOuterDisposeScope();
    }

    private Tensor ReadAdapter(string key)
    {
        if (!_adapter!.Contains(key)) throw new InvalidDataException($"{_adapter.Path}: no {key}");
        return TorchDTypes.FromBytes(_adapter.GetSpan(key), _adapter.GetInfo(key)).to(ScalarType.Float32);
    }

    /// <summary>Closes the checkpoint and the adapter.</summary>
    public void Dispose()
    {
        _adapter?.Dispose();
        Checkpoint.Dispose();
    }
}
