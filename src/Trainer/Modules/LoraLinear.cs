using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// A frozen base linear (4-bit <see cref="Linear4bit"/> or dense <see cref="Linear"/>) plus named low-rank adapters,
/// as PEFT's <c>lora.Linear</c>: <c>y = base(x) + B(A(dropout(x))) · scaling</c> for the active adapter, computed in the
/// activations' dtype from the adapter's master weights (fp32 by default) as under autocast. Parameters are
/// named <c>lora_A.&lt;adapter&gt;.weight</c> [r, in] and <c>lora_B.&lt;adapter&gt;.weight</c> [out, r].
/// A DoRA adapter (<see cref="LoraOptions.UseDora"/>) adds <c>lora_magnitude_vector.&lt;adapter&gt;.weight</c> [out] and
/// computes PEFT's <c>DoraLinearLayer</c>: with s = m / ‖W + scaling·B·A‖ per output row (the norm detached),
/// <c>y = base(x) + (s − 1)·(base(x) − bias) + s·B(A(x))·scaling</c>; with dropout in training the adapter's input is
/// dropped and <c>(s − 1)·x'Wᵀ</c> of the dropped input x' replaces <c>(s − 1)·(base(x) − bias)</c>, as PEFT does.
/// </summary>
public sealed class LoraLinear : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> _base;
    private readonly AdapterDict<Linear> _loraA = new();
    private readonly AdapterDict<Linear> _loraB = new();
    private readonly AdapterDict<MagnitudeVector> _magnitude = new();
    private readonly Dictionary<string, (double Scaling, double Dropout)> _settings = new(StringComparer.Ordinal);
    private string? _merged;
    private Tensor? _mergedNorm; // DoRA: the weight norm a merge divided by, which unmerging needs (PEFT caches it too)

    /// <summary>Wraps <paramref name="baseLayer"/> and adds the first adapter.</summary>
    public LoraLinear(nn.Module<Tensor, Tensor> baseLayer, LoraOptions options, Generator? generator = null) : base("LoraLinear")
    {
        (InFeatures, OutFeatures) = baseLayer switch
        {
            Linear4bit q => (q.InFeatures, q.OutFeatures),
            Linear l => (l.in_features, l.out_features),
            _ => throw new ArgumentException($"LoRA wraps Linear4bit or Linear, not {baseLayer.GetType().Name}"),
        };
        _base = baseLayer;
        foreach (var p in baseLayer.parameters()) p.requires_grad = false;
        register_module("base_layer", _base);
        register_module("lora_A", _loraA);
        register_module("lora_B", _loraB);
        register_module("lora_magnitude_vector", _magnitude);
        AddAdapter(options, generator);
    }

    /// <summary>Input features.</summary>
    public long InFeatures { get; }
    /// <summary>Output features.</summary>
    public long OutFeatures { get; }
    /// <summary>The frozen base layer.</summary>
    public nn.Module<Tensor, Tensor> BaseLayer => _base;
    /// <summary>The adapter used in forward.</summary>
    public string ActiveAdapter { get; private set; } = "";
    /// <summary>When true, forward is the base layer alone.</summary>
    public bool AdaptersDisabled { get; set; }
    /// <summary>The adapter currently merged into a dense base, or null.</summary>
    public string? MergedAdapter => _merged;
    /// <summary>Names of the adapters.</summary>
    public IEnumerable<string> Adapters => _settings.Keys;

    /// <summary>The A matrix of an adapter ([r, in]).</summary>
    public Parameter LoraA(string adapter) => _loraA[adapter].weight!;
    /// <summary>The B matrix of an adapter ([out, r]).</summary>
    public Parameter LoraB(string adapter) => _loraB[adapter].weight!;
    /// <summary>alpha / r (or alpha / √r) of an adapter.</summary>
    public double Scaling(string adapter) => _settings[adapter].Scaling;
    /// <summary>True when <paramref name="adapter"/> is a DoRA adapter (it has a magnitude vector).</summary>
    public bool IsDora(string adapter) => _magnitude.Contains(adapter);
    /// <summary>The DoRA magnitude vector m of an adapter ([out]), or null for a plain LoRA adapter.</summary>
    public Parameter? Magnitude(string adapter) => _magnitude.Contains(adapter) ? _magnitude[adapter].Weight : null;

    /// <summary>Adds an adapter with PEFT's initialisation and makes it active.</summary>
    public void AddAdapter(LoraOptions options, Generator? generator = null)
    {
        options.Validate();
        if (_settings.ContainsKey(options.AdapterName)) throw new ArgumentException($"adapter '{options.AdapterName}' already exists");
        var a = nn.Linear(InFeatures, options.Rank, hasBias: false, dtype: ScalarType.Float32);
        var b = nn.Linear(options.Rank, OutFeatures, hasBias: false, dtype: ScalarType.Float32);
        using (no_grad())
        {
            if (options.Init == "gaussian") a.weight!.normal_(0, 1.0 / options.Rank, generator: generator);
            else
            {
                double bound = 1.0 / Math.Sqrt(InFeatures); // kaiming_uniform(a = √5): gain·√(3/fan_in) = 1/√fan_in
                a.weight!.uniform_(-bound, bound, generator: generator);
            }
            b.weight!.zero_();
        }
        a.to(options.DType);
        b.to(options.DType);
        var device = _base.buffers().Concat(_base.parameters()).FirstOrDefault()?.device;
        if (device is not null && device.type != DeviceType.CPU) { a.to(device); b.to(device); }
        _loraA.Add(options.AdapterName, a);
        _loraB.Add(options.AdapterName, b);
        _settings[options.AdapterName] = (options.Scaling, options.Dropout);
        if (options.UseDora)
        {
            // PEFT's DoraLinearLayer.update_layer: m starts as ‖W + scaling·B·A‖ (= ‖W‖ with B = 0), so the adapted layer
            // starts equal to the base.
            using var norm = WeightNorm(b.weight!, a.weight!, options.Scaling);
            using var initial = norm.to(options.DType);
            _magnitude.Add(options.AdapterName, new MagnitudeVector(initial));
        }
        ActiveAdapter = options.AdapterName;
    }

    /// <summary>Makes another adapter the one used in forward.</summary>
    public void SetAdapter(string name)
    {
        if (!_settings.ContainsKey(name)) throw new ArgumentException($"no adapter '{name}'; adapters: {string.Join(", ", _settings.Keys)}");
        if (_merged is not null && _merged != name) throw new InvalidOperationException($"adapter '{_merged}' is merged; unmerge it before switching");
        ActiveAdapter = name;
    }

    /// <summary>y = base(x) + B(A(dropout(x)))·scaling, unless disabled or merged.</summary>
    public override Tensor forward(Tensor x)
    {
        var result = _base.forward(x);
        if (AdaptersDisabled || _merged is not null) return result;
        var (scaling, dropout) = _settings[ActiveAdapter];
        var a = _loraA[ActiveAdapter];
        var b = _loraB[ActiveAdapter];
        if (_magnitude.Contains(ActiveAdapter)) return DoraForward(x, result, a, b, _magnitude[ActiveAdapter].Weight, scaling, dropout);
        // Mixed precision: the adapter's master weights (fp32 by default) are cast to the activations' dtype for the
        // two small matmuls, as autocast does, so no fp32 copy of the input is saved for backward; their gradients
        // flow back through the casts into the master weights in the master dtype.
        // Each intermediate's handle is dropped as soon as the next op has it (what autograd saves it keeps alive), so a
        // [tokens, out] temporary does not outlive this call in the caller's dispose scope.
        bool drop = dropout > 0 && training, castA = a.weight!.dtype != x.dtype, castB = b.weight!.dtype != x.dtype;
        var input = drop ? nn.functional.dropout(x, dropout, training: true) : x;
        var wa = castA ? a.weight.to(x.dtype) : a.weight;
        var wb = castB ? b.weight!.to(x.dtype) : b.weight!;
        Tensor sum;
        using (var down = nn.functional.linear(input, wa))
        using (var up = nn.functional.linear(down, wb))
        using (var update = up * scaling)
        using (var cast = update.to(result.dtype))
            sum = result + cast;
        if (castA) wa.Dispose();
        if (castB) wb.Dispose();
        if (drop) input.Dispose();
        result.Dispose();
        return sum;
    }

    // PEFT's DoraLinearVariant.forward + DoraLinearLayer.forward, computed in the activations' dtype with the norm, the
    // scale s = m / ‖W + scaling·B·A‖ and s − 1 in float32 (rounded once to the activations' dtype).
    private Tensor DoraForward(Tensor x, Tensor result, Linear a, Linear b, Parameter magnitude, double scaling, double dropout)
    {
        using var scope = NewDisposeScope();
        bool drop = dropout > 0 && training;
        var input = drop ? nn.functional.dropout(x, dropout, training: true) : x;
        var wa = a.weight!.dtype != x.dtype ? a.weight.to(x.dtype) : a.weight;
        var wb = b.weight!.dtype != x.dtype ? b.weight!.to(x.dtype) : b.weight!;
        var up = nn.functional.linear(nn.functional.linear(input, wa), wb);         // B(A(x)), not yet scaled
        var norm = WeightNorm(b.weight!, a.weight!, scaling);                       // float32, no gradient
        var s = magnitude.to(ScalarType.Float32) / norm;                            // gradient flows to m only
        var baseResult = drop ? BaseWithoutBias(input)                              // x'Wᵀ of the dropped input
            : BaseBias is { } bias ? result - bias : result;                        // base(x) − bias
        var dt = baseResult.dtype;
        var dora = baseResult * (s - 1).to(dt) + up.to(dt) * (s * scaling).to(dt);
        var sum = result + dora.to(result.dtype);
        result.Dispose();
        return sum.MoveToOuterDisposeScope();
    }

    // The base layer's x·Wᵀ without its bias (a 4-bit base dequantizes again, saving nothing for backward).
    private Tensor BaseWithoutBias(Tensor x) => _base switch
    {
        Linear4bit q => q.ProjectWithoutBias(x),
        Linear l => nn.functional.linear(x.dtype == l.weight!.dtype ? x : x.to(l.weight.dtype), l.weight),
        _ => throw new InvalidOperationException("unreachable"),
    };

    private Tensor? BaseBias => _base switch
    {
        Linear4bit q => q.Bias,
        Linear l => l.bias,
        _ => null,
    };

    /// <summary>
    /// DoRA's weight norm ‖W + scaling·B·A‖ per output row (float32 [out], no gradient) of the base weight: a 4-bit base
    /// is dequantized to the dtype it was quantized from (bitsandbytes' <c>dequantize_4bit</c>, what PEFT reads), once,
    /// and dropped after; the float32 work runs in bounded row chunks (<see cref="DoraWeightNorm"/>).
    /// </summary>
    public Tensor WeightNorm(Tensor loraB, Tensor loraA, double scaling)
    {
        using var _ = no_grad();
        if (_base is Linear4bit q)
        {
            using var w = q.Dequantize(TorchDTypes.ToScalarType(q.OriginalDType));
            return DoraWeightNorm.Compute(w, loraB, loraA, scaling);
        }
        return DoraWeightNorm.Compute(((Linear)_base).weight!, loraB, loraA, scaling);
    }

    /// <summary>The dense update scaling·B·A ([out, in], float32).</summary>
    public Tensor DeltaWeight(string adapter)
    {
        using var _ = no_grad();
        return LoraB(adapter).to(ScalarType.Float32).matmul(LoraA(adapter).to(ScalarType.Float32)) * Scaling(adapter);
    }

    /// <summary>Adds the active adapter into a dense base weight (W += scaling·B·A); a 4-bit base cannot be merged in place.</summary>
    public void Merge()
    {
        if (_merged is not null) throw new InvalidOperationException($"adapter '{_merged}' is already merged");
        if (_base is not Linear dense)
            throw new InvalidOperationException("merging into a 4-bit base would re-quantize it; merge into a dense copy of the model instead (qlora merge writes one)");
        using (no_grad())
        using (var delta = DeltaWeight(ActiveAdapter))
        {
            if (Magnitude(ActiveAdapter) is { } m)
            {
                // PEFT's DoRA merge: W' = (m / ‖W + ΔW‖) · (W + ΔW) per row, in float32; the norm is kept for unmerge.
                using var scope = NewDisposeScope();
                var sum = dense.weight!.to(ScalarType.Float32).add_(delta);
                var norm = linalg.vector_norm(sum, 2, [1], false);
                var factor = (m.detach().to(ScalarType.Float32) / norm).unsqueeze(1);
                dense.weight.copy_(sum.mul_(factor));
                _mergedNorm = norm.MoveToOuterDisposeScope();
            }
            else dense.weight!.add_(delta.to(dense.weight.dtype));
        }
        _merged = ActiveAdapter;
    }

    /// <summary>Subtracts the merged adapter from the dense base weight again.</summary>
    public void Unmerge()
    {
        if (_merged is null) throw new InvalidOperationException("no adapter is merged");
        var dense = (Linear)_base;
        using (no_grad())
        using (var delta = DeltaWeight(_merged))
        {
            if (Magnitude(_merged) is { } m)
            {
                // PEFT's DoRA unmerge: W = W' / (m / ‖W + ΔW‖) − ΔW with the norm cached at merge time.
                using var scope = NewDisposeScope();
                var factor = (m.detach().to(ScalarType.Float32) / _mergedNorm!).unsqueeze(1);
                dense.weight!.copy_(dense.weight.to(ScalarType.Float32).div_(factor).sub_(delta));
                _mergedNorm!.Dispose();
                _mergedNorm = null;
            }
            else dense.weight!.sub_(delta.to(dense.weight.dtype));
        }
        _merged = null;
    }

    /// <summary>Adapters by name, registered so their parameters are named <c>&lt;adapter&gt;.weight</c> (PEFT's ModuleDict).</summary>
    private sealed class AdapterDict<T> : nn.Module where T : nn.Module
    {
        private readonly Dictionary<string, T> _items = new(StringComparer.Ordinal);

        public AdapterDict() : base("ModuleDict") { }

        public T this[string name] => _items[name];

        public bool Contains(string name) => _items.ContainsKey(name);

        public void Add(string name, T module)
        {
            _items.Add(name, module);
            register_module(name, module);
        }
    }

    /// <summary>DoRA's magnitude m [out] as PEFT's <c>DoraLinearLayer</c> holds it: a module whose parameter is <c>weight</c>.</summary>
    private sealed class MagnitudeVector : nn.Module
    {
        public MagnitudeVector(Tensor initial) : base("DoraLinearLayer") =>
            register_parameter("weight", new Parameter(initial.detach(), requires_grad: true));

        // Looked up by name: Module.to replaces registered tensors.
        public Parameter Weight => get_parameter("weight")!;
    }
}
