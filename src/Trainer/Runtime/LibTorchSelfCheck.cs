using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Runtime;

/// <summary>One self-check line: what was computed, on which device, whether it matched its reference.</summary>
public sealed record SelfCheckLine(string Name, string Device, bool Passed, string Detail);

/// <summary>
/// Proves that the loaded libtorch computes what this build expects before any work runs on it: a matmul against a
/// float64 computation in C#, and a custom-autograd function's backward (the mechanism Linear4bit and checkpointing
/// rest on) against its hand-derived gradient; on CUDA the same again, compared with the CPU's results. Run by
/// <c>qlora doctor</c> always, and before any verb when the libtorch version differs from the shim's.
/// </summary>
public static class LibTorchSelfCheck
{
    /// <summary>Runs the checks on the CPU and, when <paramref name="cuda"/> is set, on CUDA device 0.</summary>
    public static IReadOnlyList<SelfCheckLine> Run(bool cuda)
    {
        var lines = new List<SelfCheckLine>();
        using var scope = NewDisposeScope();
        lines.Add(Guard("matmul fp32", "cpu", () => MatmulAgainstReference(CPU, ScalarType.Float32, 1e-5)));
        lines.Add(Guard("matmul bf16", "cpu", () => MatmulAgainstReference(CPU, ScalarType.BFloat16, 2e-2)));
        lines.Add(Guard("custom autograd backward", "cpu", () => CustomBackward(CPU)));
        if (!cuda) return lines;
        var device = torch.device(DeviceType.CUDA, 0);
        lines.Add(Guard("matmul fp32", "cuda:0", () => MatmulAgainstReference(device, ScalarType.Float32, 1e-5)));
        lines.Add(Guard("matmul bf16", "cuda:0", () => MatmulAgainstReference(device, ScalarType.BFloat16, 2e-2)));
        lines.Add(Guard("matmul fp32 cuda vs cpu", "cuda:0", () => CudaVersusCpu(device)));
        lines.Add(Guard("custom autograd backward", "cuda:0", () => CustomBackward(device)));
        return lines;
    }

    private static SelfCheckLine Guard(string name, string device, Func<(bool, string)> check)
    {
        try
        {
            var (ok, detail) = check();
            return new SelfCheckLine(name, device, ok, detail);
        }
        catch (Exception e)
        {
            return new SelfCheckLine(name, device, false, e.Message.ReplaceLineEndings(" "));
        }
    }

    /// <summary>A 48×40 by 40×24 product of values in [-1, 1) against a float64 product computed here; relative error of the largest difference.</summary>
    private static (bool, string) MatmulAgainstReference(Device device, ScalarType dtype, double tolerance)
    {
        const int M = 48, K = 40, N = 24;
        var a = Values(M * K, 1);
        var b = Values(K * N, 2);
        using var scope = NewDisposeScope();
        var ta = tensor(a, [M, K]).to(dtype).to(device);
        var tb = tensor(b, [K, N]).to(dtype).to(device);
        // The reference uses the inputs as the device saw them (rounded to dtype), so only the product's rounding counts.
        var ar = ta.to(ScalarType.Float64).cpu().data<double>().ToArray();
        var br = tb.to(ScalarType.Float64).cpu().data<double>().ToArray();
        var c = matmul(ta, tb).to(ScalarType.Float64).cpu().data<double>().ToArray();
        double worst = 0, scale = 0;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++)
            {
                double s = 0;
                for (int k = 0; k < K; k++) s += ar[i * K + k] * br[k * N + j];
                worst = Math.Max(worst, Math.Abs(s - c[i * N + j]));
                scale = Math.Max(scale, Math.Abs(s));
            }
        double rel = worst / Math.Max(scale, 1e-30);
        return (rel <= tolerance, $"max relative error {rel:G3} (tolerance {tolerance:G3})");
    }

    /// <summary>A 256³ fp32 product on CUDA against the same product on the CPU.</summary>
    private static (bool, string) CudaVersusCpu(Device device)
    {
        using var scope = NewDisposeScope();
        var a = tensor(Values(256 * 256, 3), [256, 256]).to(ScalarType.Float32);
        var b = tensor(Values(256 * 256, 4), [256, 256]).to(ScalarType.Float32);
        var cpu = matmul(a, b);
        var gpu = matmul(a.to(device), b.to(device)).cpu();
        double rel = (gpu - cpu).abs().max().item<float>() / Math.Max(cpu.abs().max().item<float>(), 1e-30f);
        return (rel <= 1e-4, $"max relative difference {rel:G3} (tolerance 1e-4; TF32 would show ~1e-3)");
    }

    /// <summary>sum(w · cube(x)) through a custom autograd function: the gradient must be 3x²·w exactly (small dyadic values).</summary>
    private static (bool, string) CustomBackward(Device device)
    {
        using var scope = NewDisposeScope();
        var x = tensor(new[] { 1.5, -2.0, 0.5, 3.0 }, ScalarType.Float64).to(device).requires_grad_(true);
        var w = tensor(new[] { 1.0, 2.0, 3.0, -0.25 }, ScalarType.Float64).to(device);
        var loss = (Cube.apply(x) * w).sum();
        loss.backward();
        var grad = x.grad?.cpu().data<double>().ToArray();
        double[] expected = [6.75, 24.0, 2.25, -6.75];
        bool ok = grad != null && grad.SequenceEqual(expected) && loss.cpu().item<double>() == 3.375 - 16.0 + 0.375 - 6.75;
        return (ok, grad == null ? "no gradient reached the input" : $"gradient [{string.Join(", ", grad)}], expected [{string.Join(", ", expected)}]");
    }

    private static float[] Values(int n, int seed)
    {
        var random = new Random(seed);
        var v = new float[n];
        for (int i = 0; i < n; i++) v[i] = (float)(random.NextDouble() * 2 - 1);
        return v;
    }

    private sealed class Cube : autograd.SingleTensorFunction<Cube>
    {
        public override string Name => "SelfCheckCubeBackward";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var x = (Tensor)vars[0];
            ctx.save_for_backward([x]);
            return x * x * x;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
        {
            var x = ctx.get_saved_variables()[0];
            return [grad * 3 * x * x];
        }
    }
}
