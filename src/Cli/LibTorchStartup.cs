using System.Runtime.CompilerServices;
using QLora.Trainer.Runtime;

namespace QLora.Cli;

/// <summary>
/// Preloads the libtorch named by <c>QLORA_LIBTORCH</c> or <c>--libtorch</c> when the <c>qlora</c> assembly loads,
/// before <c>Main</c> parses anything and before any code touches TorchSharp's <c>torch</c> class (its static
/// constructor loads libtorch by name, and what is loaded first wins). The command line is read raw for that reason.
/// On Windows it first sets the environment libtorch's native runtime reads as it loads (<see cref="WindowsNativeEnvironment"/>).
/// </summary>
internal static class LibTorchStartup
{
    [ModuleInitializer]
    internal static void Initialize()
    {
        WindowsNativeEnvironment.Apply(); // before libtorch's native runtime loads and reads it
        LibTorchPreload.Startup(Environment.GetCommandLineArgs().Skip(1).ToArray(), Environment.GetEnvironmentVariable);
    }

    /// <summary>Verbs that run without a usable libtorch (they explain or touch no torch).</summary>
    private static readonly HashSet<string> NeedNoTorch = ["doctor", "--help", "-h", "-?", "--version"];

    /// <summary>
    /// Null when the verb may run; else the one line that says why not. A libtorch of another minor version (allowed by
    /// the user) must first pass the self-check, on CUDA too when CUDA is available.
    /// </summary>
    public static string? Refusal(string[] args)
    {
        var preload = LibTorchPreload.Current;
        if (preload == null) return null;
        string? verb = args.FirstOrDefault(a => !a.StartsWith("--libtorch", StringComparison.Ordinal) && a != preload.Requested);
        if (args.Length == 0 || verb == null || NeedNoTorch.Contains(verb) || args.Any(NeedNoTorch.Contains)) return null;
        if (!preload.Usable) return preload.Error;
        if (!preload.SelfCheckRequired) return null;
        var failed = LibTorchSelfCheck.Run(cuda: TorchSharp.torch.cuda.is_available()).Where(l => !l.Passed).ToList();
        return failed.Count == 0 ? null
            : $"the libtorch in {preload.Directory} ({preload.Version?.Text ?? "unknown version"}) failed the self-check that {LibTorchPreload.AllowMismatchVariable}=1 requires: " +
              string.Join("; ", failed.Select(l => $"{l.Name} on {l.Device}: {l.Detail}")) + $". Use a libtorch {LibTorchVersion.Shim.Major}.{LibTorchVersion.Shim.Minor}.";
    }
}
