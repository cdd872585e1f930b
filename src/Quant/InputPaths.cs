namespace QLora.Quant;

/// <summary>
/// Checks that an input path names the kind of thing expected, so a folder given where a file is expected (or the
/// reverse) is one line saying so and naming the option, instead of "does not exist" or a failure further in.
/// </summary>
public static class InputPaths
{
    /// <summary>Refuses (<see cref="DirectoryNotFoundException"/> or <see cref="IOException"/>) unless <paramref name="path"/> is a folder.</summary>
    public static void RequireFolder(string option, string path, string what)
    {
        if (Directory.Exists(path)) return;
        if (File.Exists(path)) throw new IOException($"{option} {path} is a file; {what} is expected");
        throw new DirectoryNotFoundException($"{option} {path} does not exist; {what} is expected");
    }

    /// <summary>Refuses (<see cref="FileNotFoundException"/> or <see cref="IOException"/>) unless <paramref name="path"/> is a file.</summary>
    public static void RequireFile(string option, string path, string what)
    {
        if (File.Exists(path)) return;
        if (Directory.Exists(path)) throw new IOException($"{option} {path} is a folder; {what} is expected");
        throw new FileNotFoundException($"{option} {path} does not exist; {what} is expected", path);
    }
}
