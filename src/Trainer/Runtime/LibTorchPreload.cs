using System.Runtime.InteropServices;

namespace QLora.Trainer.Runtime;

/// <summary>Where the process's libtorch comes from.</summary>
public enum LibTorchSource
{
    /// <summary>The libtorch files shipped in the app folder (the default build); TorchSharp loads them itself.</summary>
    Bundled,
    /// <summary>A folder named by <c>QLORA_LIBTORCH</c>, preloaded by full path.</summary>
    Environment,
    /// <summary>A folder named by <c>--libtorch</c>, preloaded by full path.</summary>
    CommandLine,
    /// <summary>None: the app ships no libtorch and none was named.</summary>
    None,
}

/// <summary>
/// Finds and preloads the libtorch the TorchSharp shim will run on, before anything touches TorchSharp's <c>torch</c>
/// class (whose static constructor loads libtorch by name). A PyTorch installation's <c>torch/lib</c> (or a libtorch
/// zip's <c>lib</c>) named by <c>QLORA_LIBTORCH</c> or <c>--libtorch</c> is loaded by full path, dependencies first;
/// TorchSharp's later loads by name then find those libraries already in the process. Refuses, without loading
/// anything, a folder that is incomplete, a different libtorch minor version than the shim's (unless
/// <c>QLORA_LIBTORCH_ALLOW_MISMATCH=1</c>), and an app folder that ships its own libtorch too: two libtorch builds in one
/// process abort ("multiple backend fallbacks") or silently mix. This type never touches <c>torch</c>.
/// </summary>
public sealed class LibTorchPreload
{
    /// <summary>The environment variable naming a libtorch folder.</summary>
    public const string EnvironmentVariable = "QLORA_LIBTORCH";
    /// <summary>The command-line option naming a libtorch folder (read from the raw command line, before parsing).</summary>
    public const string Option = "--libtorch";
    /// <summary>Set to 1 to run on a libtorch whose minor version differs from the shim's, after a self-check.</summary>
    public const string AllowMismatchVariable = "QLORA_LIBTORCH_ALLOW_MISMATCH";

    private const string FindTorchLib = "python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), \"lib\"))'";

    private LibTorchPreload(LibTorchSource source) => Source = source;

    /// <summary>The outcome of this process's startup preload (<see cref="Startup"/>); null before it ran (a library host that never called it).</summary>
    public static LibTorchPreload? Current { get; private set; }

    /// <summary>Where libtorch comes from.</summary>
    public LibTorchSource Source { get; }

    /// <summary>The folder as the user named it (null for <see cref="LibTorchSource.Bundled"/> and <see cref="LibTorchSource.None"/>).</summary>
    public string? Requested { get; private init; }

    /// <summary>The libtorch library folder in use (the resolved <c>lib</c> folder, or the app folder that bundles it).</summary>
    public string? Directory { get; private init; }

    /// <summary>The libtorch version read from its files (null if unknown; the bundled one is the shim's own).</summary>
    public LibTorchVersion? Version { get; private init; }

    /// <summary>True when the folder holds the CUDA libraries (<c>libtorch_cuda</c>, <c>libc10_cuda</c>).</summary>
    public bool HasCudaLibraries { get; private init; }

    /// <summary>The files loaded by full path, in order.</summary>
    public IReadOnlyList<string> Loaded { get; private set; } = [];

    /// <summary>True when the version differs from the shim's (or is unknown) and the user allowed it: a self-check must pass before any work.</summary>
    public bool SelfCheckRequired { get; private init; }

    /// <summary>Why libtorch cannot be used (one line: what is wrong and what to do); null when it can.</summary>
    public string? Error { get; private set; }

    /// <summary>True when TorchSharp may be touched.</summary>
    public bool Usable => Error == null;

    /// <summary>
    /// The process's startup step (called from the <c>qlora</c> module initializer): reads the request from the raw
    /// command line and the environment, checks it against the app folders and loads it. Never throws; the outcome is
    /// in <see cref="Current"/>.
    /// </summary>
    public static LibTorchPreload Startup(string[] commandLine, Func<string, string?> environment)
    {
        LibTorchPreload outcome;
        try
        {
            outcome = Prepare(commandLine, environment, AppFolders());
            if (outcome.Usable && outcome.Source is LibTorchSource.Environment or LibTorchSource.CommandLine) outcome.Load();
        }
        catch (Exception e)
        {
            outcome = new LibTorchPreload(LibTorchSource.None) { Error = $"libtorch preload failed: {e.Message.ReplaceLineEndings(" ")}" };
        }
        Current = outcome;
        return outcome;
    }

    /// <summary>
    /// Decides what to load without loading anything: the request (<c>--libtorch</c> wins over <c>QLORA_LIBTORCH</c>),
    /// its folder, files and version, and the app folders (<paramref name="appFolders"/>) that must not bundle a libtorch too.
    /// </summary>
    public static LibTorchPreload Prepare(string[] commandLine, Func<string, string?> environment, IEnumerable<string> appFolders)
    {
        var bundled = FindBundled(appFolders);
        string? requested = null;
        var source = LibTorchSource.None;
        for (int i = 0; i < commandLine.Length; i++)
        {
            if (commandLine[i] == Option)
            {
                if (i + 1 >= commandLine.Length || commandLine[i + 1].StartsWith('-'))
                    return new LibTorchPreload(LibTorchSource.CommandLine) { Error = $"{Option} needs a folder: {Option} <.../site-packages/torch/lib>" };
                requested = commandLine[i + 1];
                source = LibTorchSource.CommandLine;
            }
            else if (commandLine[i].StartsWith(Option + "=", StringComparison.Ordinal))
            {
                requested = commandLine[i][(Option.Length + 1)..];
                source = LibTorchSource.CommandLine;
            }
        }
        if (requested == null && environment(EnvironmentVariable) is { Length: > 0 } fromEnvironment)
        {
            requested = fromEnvironment;
            source = LibTorchSource.Environment;
        }
        string how = source == LibTorchSource.CommandLine ? Option : EnvironmentVariable;

        if (requested == null)
        {
            if (bundled != null)
                return new LibTorchPreload(LibTorchSource.Bundled) { Directory = Path.GetDirectoryName(bundled), Version = LibTorchVersion.Parse(LibTorchVersion.Shim.Text, null, "bundled package") };
            return new LibTorchPreload(LibTorchSource.None)
            {
                Error = $"this qlora ships no libtorch (built with -p:TorchBackend=external): set {EnvironmentVariable}=<folder> or pass {Option} <folder>, " +
                        $"the lib folder of a PyTorch {LibTorchVersion.Shim.Major}.{LibTorchVersion.Shim.Minor} installation (find it with: {FindTorchLib})",
            };
        }

        var directory = ResolveLibDirectory(requested);
        if (directory == null)
            return new LibTorchPreload(source) { Requested = requested, Error = MissingFilesMessage(requested, how) };
        if (bundled != null && !SameFolder(Path.GetDirectoryName(bundled)!, directory))
            return new LibTorchPreload(source)
            {
                Requested = requested,
                Directory = directory,
                Error = $"{how} names {directory}, but this qlora also ships its own libtorch ({bundled}): two libtorch builds in one process abort or silently mix. " +
                        $"Use a qlora published with -p:TorchBackend=external (scripts/publish-gpu-check.sh), or unset {EnvironmentVariable} / drop {Option} to use the bundled CPU libtorch.",
            };

        var version = LibTorchVersion.Read(directory);
        bool allow = environment(AllowMismatchVariable) == "1";
        string shim = $"{LibTorchVersion.Shim.Major}.{LibTorchVersion.Shim.Minor}";
        bool cuda = LibTorchFiles.Cuda.All(f => File.Exists(Path.Combine(directory, f)));
        if (version == null && !allow)
            return new LibTorchPreload(source)
            {
                Requested = requested, Directory = directory, HasCudaLibraries = cuda,
                Error = $"cannot tell the version of the libtorch in {directory} (no torch/version.py or build-version beside it); this qlora's TorchSharp shim is built for libtorch {shim}. " +
                        $"Point {how} at a PyTorch {shim} installation's torch/lib, or set {AllowMismatchVariable}=1 to run after a CPU/CUDA self-check.",
            };
        if (version != null && !version.MatchesShim && !allow)
            return new LibTorchPreload(source)
            {
                Requested = requested, Directory = directory, Version = version, HasCudaLibraries = cuda,
                Error = $"the libtorch in {directory} is {version.Text} ({version.SourceFile}) but this qlora's TorchSharp shim is built for libtorch {shim}: a different minor version can fail to load, " +
                        $"stop at a missing symbol or compute wrongly. Use a PyTorch {shim} installation, or set {AllowMismatchVariable}=1 to run after a CPU/CUDA self-check.",
            };
        return new LibTorchPreload(source)
        {
            Requested = requested, Directory = directory, Version = version, HasCudaLibraries = cuda,
            SelfCheckRequired = version == null || !version.MatchesShim,
        };
    }

    /// <summary>Loads the libraries by full path in dependency order; on failure sets <see cref="Error"/> (what failed, the loader's words).</summary>
    public void Load()
    {
        if (Directory == null || Error != null) return;
        var loaded = new List<string>();
        foreach (var name in LibTorchFiles.LoadOrder(HasCudaLibraries))
        {
            var path = Path.Combine(Directory, name);
            try
            {
                NativeLibrary.Load(path);
                loaded.Add(path);
            }
            catch (Exception e) when (e is DllNotFoundException or BadImageFormatException)
            {
                Loaded = loaded;
                Error = $"loading {path} failed: {e.Message.ReplaceLineEndings(" ")}. " +
                        (HasCudaLibraries && name.Contains("cuda", StringComparison.Ordinal)
                            ? "The CUDA libraries of this PyTorch installation did not load (their nvidia-* dependencies in site-packages/nvidia/*/lib, or the driver): check that 'import torch' works in its Python."
                            : "Check that the folder is a complete libtorch for this OS and architecture.");
                return;
            }
        }
        Loaded = loaded;
    }

    /// <summary>The folders the runtime probes for native libraries (app folder, deps.json native asset folders).</summary>
    public static IReadOnlyList<string> AppFolders()
    {
        var folders = new List<string> { AppContext.BaseDirectory };
        if (AppContext.GetData("NATIVE_DLL_SEARCH_DIRECTORIES") is string probing)
            folders.AddRange(probing.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries));
        var rid = Path.Combine(AppContext.BaseDirectory, "runtimes");
        if (System.IO.Directory.Exists(rid))
            folders.AddRange(System.IO.Directory.GetDirectories(rid).Select(d => Path.Combine(d, "native")));
        return folders.Where(System.IO.Directory.Exists).Select(Path.GetFullPath).Distinct().ToList();
    }

    /// <summary>The first libtorch file found in <paramref name="folders"/>, or null.</summary>
    public static string? FindBundled(IEnumerable<string> folders) =>
        folders.SelectMany(f => LibTorchFiles.All.Select(n => Path.Combine(f, n))).FirstOrDefault(File.Exists);

    /// <summary>The library folder for a path naming it, its parent package (<c>site-packages/torch</c>, a libtorch zip's root) or null when neither holds the required files.</summary>
    public static string? ResolveLibDirectory(string requested)
    {
        string full;
        try { full = Path.GetFullPath(requested); }
        catch (Exception e) when (e is ArgumentException or NotSupportedException or PathTooLongException) { return null; }
        foreach (var candidate in new[] { full, Path.Combine(full, "lib") })
            if (LibTorchFiles.Required.All(f => File.Exists(Path.Combine(candidate, f))))
                return Path.TrimEndingDirectorySeparator(candidate);
        return null;
    }

    private static string MissingFilesMessage(string requested, string how)
    {
        string what = System.IO.Directory.Exists(requested)
            ? $"{requested} does not hold {string.Join(", ", LibTorchFiles.Required.Where(f => !File.Exists(Path.Combine(requested, f))))}"
            : $"{requested} does not exist";
        return $"{how}: {what}. Name the folder holding {string.Join(", ", LibTorchFiles.Required)} (and {string.Join(", ", LibTorchFiles.Cuda)} for CUDA), " +
               $"e.g. a PyTorch installation's torch/lib (find it with: {FindTorchLib}).";
    }

    private static bool SameFolder(string a, string b) =>
        string.Equals(Path.TrimEndingDirectorySeparator(Path.GetFullPath(a)), Path.TrimEndingDirectorySeparator(Path.GetFullPath(b)),
            OperatingSystem.IsWindows() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal);
}
