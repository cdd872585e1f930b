namespace QLora.Quant;

/// <summary>
/// Whether an output location is, contains or lies inside an input, after resolving symbolic links: writing there
/// would replace or delete the input itself, so verbs refuse it whatever their overwrite option says.
/// </summary>
public static class PathOverlap
{
    /// <summary>
    /// The absolute path of <paramref name="path"/> with every symbolic link among its existing components resolved
    /// (the part that does not exist yet is appended as written).
    /// </summary>
    public static string Resolve(string path)
    {
        var full = Path.GetFullPath(path);
        var root = Path.GetPathRoot(full)!;
        var current = root;
        var parts = full[root.Length..].Split(Path.DirectorySeparatorChar, StringSplitOptions.RemoveEmptyEntries);
        for (int i = 0; i < parts.Length; i++)
        {
            var next = Path.Combine(current, parts[i]);
            FileSystemInfo info = Directory.Exists(next) ? new DirectoryInfo(next) : new FileInfo(next);
            if (!info.Exists) return Path.Combine([current, .. parts[i..]]);
            if (info.LinkTarget is not null)
            {
                var target = info.ResolveLinkTarget(returnFinalTarget: true);
                next = target is null ? next : Resolve(target.FullName);
            }
            current = next;
        }
        return current;
    }

    /// <summary>How <paramref name="output"/> overlaps <paramref name="input"/> ("is", "lies inside", "contains"), or null.</summary>
    public static string? Describe(string input, string output)
    {
        string i = Trim(Resolve(input)), o = Trim(Resolve(output));
        var cmp = OperatingSystem.IsWindows() || OperatingSystem.IsMacOS() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal;
        if (string.Equals(i, o, cmp)) return "is";
        if (o.StartsWith(i + Path.DirectorySeparatorChar, cmp)) return "lies inside";
        if (i.StartsWith(o + Path.DirectorySeparatorChar, cmp)) return "contains";
        return null;
    }

    /// <summary>
    /// Refuses (<see cref="IOException"/>, one line naming both options) an output that overlaps any of the inputs.
    /// <paramref name="outputName"/> and each input's name are how the user spelled them (e.g. <c>--output</c>).
    /// </summary>
    public static void Refuse(string outputName, string output, params (string Name, string Path)[] inputs)
    {
        foreach (var (name, path) in inputs)
        {
            if (Describe(path, output) is { } how)
                throw new IOException($"{outputName} {output} {how} {name} {path}; an output must not be, contain or lie inside an input (writing it would replace or change the input), with or without overwrite; choose an output outside the input");
        }
    }

    static string Trim(string p) => p.Length > Path.GetPathRoot(p)!.Length ? p.TrimEnd(Path.DirectorySeparatorChar) : p;
}
