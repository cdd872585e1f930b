using System.CommandLine;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// <c>qlora bench nccl</c>: the NCCL all-reduce data-parallel CUDA ranks sum their gradients with, checked exactly and
/// timed; one process is a 1-rank communicator, <c>mpirun -np N</c> measures N ranks (one GPU each).
/// </summary>
internal static class AllReduceBenchmarkVerb
{
    public static Command Create(TextWriter stdout)
    {
        var d = new AllReduceBenchmark.Options { Device = ComputeDevice.Cpu };
        var mib = new Option<int>("--mib") { Description = "buffer size in MiB (160: the float32 gradients of r = 16 on every projection of Llama-2-7B)", DefaultValueFactory = _ => d.Mebibytes };
        var runs = new Option<int>("--runs") { Description = "timed all-reduces (median reported)", DefaultValueFactory = _ => d.Runs };
        var device = DeviceOptions.Device("the CUDA device: cuda, cuda:N or auto (under mpirun each rank takes its local rank's device)");
        var cmd = new Command("nccl", "The NCCL all-reduce of a gradient-sized float32 buffer: exact sum check, time, algorithm and bus bandwidth.")
        {
            mib, runs, device,
        };
        cmd.SetAction(r =>
        {
            var on = DeviceSelector.Resolve(r.GetValue(device), "--device", stdout.WriteLine);
            using var ranks = DataParallel.Start("auto", TimeSpan.FromMinutes(5));
            var o = new AllReduceBenchmark.Options { Device = on, Mebibytes = r.GetValue(mib), Runs = r.GetValue(runs) };
            var result = AllReduceBenchmark.Run(o, ranks, ranks.IsRoot ? stdout.WriteLine : null);
            if (ranks.IsRoot)
            {
                stdout.WriteLine($"{result.Nccl} ({result.Source}), {result.Ranks} rank(s) on {on.Description}");
                stdout.WriteLine($"all-reduce of {result.Bytes / 1048576.0:F0} MiB float32: {result.MedianSeconds * 1e3:F2} ms (median of {o.Runs}), " +
                    $"algorithm bandwidth {result.AlgorithmGBps:F1} GB/s, bus bandwidth {result.BusGBps:F1} GB/s; sum {(result.Exact ? "exact" : $"WRONG in {result.Mismatches} elements")}");
                stdout.WriteLine(result.ToJson(on.Name));
            }
            ranks.Finish();
            return result.Exact ? 0 : 1;
        });
        return cmd;
    }
}
