using System.Globalization;
using System.Reflection;
using System.Text.RegularExpressions;

namespace QLora.Trainer.Runtime;

/// <summary>
/// A libtorch version as its installation states it (<c>2.11.0+cu128</c>), read from files beside its <c>lib/</c>
/// folder without loading anything: <c>torch/version.py</c> in a PyTorch installation, <c>build-version</c> in a
/// libtorch zip, the <c>.nuspec</c> of a <c>libtorch-*</c> NuGet package (<c>runtimes/&lt;rid&gt;/native</c>). The TorchSharp shim is compiled against one libtorch minor version; another one can fail to load,
/// die at the first missing symbol, or compute wrongly, so it is compared before the libraries are loaded.
/// </summary>
public sealed partial record LibTorchVersion(int Major, int Minor, int Patch, string Text, string? Cuda, string SourceFile)
{
    /// <summary>The libtorch version the TorchSharp shim of this build is made for (from Directory.Packages.props, stamped into this assembly).</summary>
    public static (int Major, int Minor, string Text) Shim { get; } = ReadShimVersion();

    /// <summary>True when major and minor equal the shim's (patch releases keep the C++ API).</summary>
    public bool MatchesShim => Major == Shim.Major && Minor == Shim.Minor;

    /// <summary>True for a CUDA build (<c>+cu128</c>, or a <c>cuda</c> entry in version.py).</summary>
    public bool IsCudaBuild => Cuda != null || Text.Contains("+cu", StringComparison.Ordinal);

    /// <summary>Reads the version of the libtorch whose library folder is <paramref name="libDirectory"/>; null when no version file is found or it cannot be parsed.</summary>
    public static LibTorchVersion? Read(string libDirectory)
    {
        var parent = Path.GetDirectoryName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(libDirectory)));
        if (parent == null) return null;
        var versionPy = Path.Combine(parent, "version.py");
        if (File.Exists(versionPy)) return ParseVersionPy(File.ReadAllText(versionPy), versionPy);
        var buildVersion = Path.Combine(parent, "build-version");
        if (File.Exists(buildVersion)) return Parse(File.ReadAllText(buildVersion).Trim(), null, buildVersion);
        // A NuGet package: <id>/<version>/runtimes/<rid>/native, with <id>.nuspec in <id>/<version>.
        var package = Path.GetDirectoryName(Path.GetDirectoryName(parent));
        if (package != null && Path.GetFileName(Path.GetDirectoryName(parent)) == "runtimes")
            foreach (var nuspec in Directory.GetFiles(package, "libtorch-*.nuspec"))
                if (NuspecVersion().Match(File.ReadAllText(nuspec)) is { Success: true } m)
                    return Parse(m.Groups["v"].Value, null, nuspec);
        return null;
    }

    /// <summary>Parses PyTorch's generated <c>torch/version.py</c> (<c>__version__ = '2.11.0+cu128'</c>, <c>cuda = '12.8'</c> or <c>None</c>).</summary>
    public static LibTorchVersion? ParseVersionPy(string text, string sourceFile)
    {
        var v = VersionPyEntry().Match(text);
        if (!v.Success) return null;
        var cuda = CudaPyEntry().Match(text);
        return Parse(v.Groups["v"].Value, cuda.Success ? cuda.Groups["v"].Value : null, sourceFile);
    }

    /// <summary>Parses a version string such as <c>2.10.0</c>, <c>2.11.0+cu128</c> or <c>2.12.0.dev20260101+cpu</c>.</summary>
    public static LibTorchVersion? Parse(string text, string? cuda, string sourceFile)
    {
        var m = VersionNumbers().Match(text);
        if (!m.Success) return null;
        int patch = m.Groups["p"].Success ? int.Parse(m.Groups["p"].Value, CultureInfo.InvariantCulture) : 0;
        return new LibTorchVersion(int.Parse(m.Groups["a"].Value, CultureInfo.InvariantCulture),
            int.Parse(m.Groups["b"].Value, CultureInfo.InvariantCulture), patch, text.Trim(), cuda, sourceFile);
    }

    private static (int, int, string) ReadShimVersion()
    {
        var stamped = typeof(LibTorchVersion).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>()
            .FirstOrDefault(a => a.Key == "QLora.LibTorchVersion")?.Value;
        var parsed = stamped == null ? null : Parse(stamped, null, "assembly metadata");
        if (parsed == null) throw new InvalidOperationException("QLora.Trainer was built without its QLora.LibTorchVersion stamp (Directory.Packages.props: LibTorchVersion).");
        return (parsed.Major, parsed.Minor, parsed.Text);
    }

    [GeneratedRegex(@"^\s*__version__\s*(?::\s*\w+\s*)?=\s*['""](?<v>[^'""]+)['""]", RegexOptions.Multiline)]
    private static partial Regex VersionPyEntry();

    [GeneratedRegex(@"^\s*cuda\s*(?::\s*[\w\[\]]+\s*)?=\s*['""](?<v>[^'""]+)['""]", RegexOptions.Multiline)]
    private static partial Regex CudaPyEntry();

    [GeneratedRegex(@"<version>\s*(?<v>[^<\s]+)\s*</version>")]
    private static partial Regex NuspecVersion();

    [GeneratedRegex(@"^\s*(?<a>\d+)\.(?<b>\d+)(?:\.(?<p>\d+))?")]
    private static partial Regex VersionNumbers();
}
