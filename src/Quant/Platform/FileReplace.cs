namespace QLora.Quant;

/// <summary>
/// The renames and deletes through which the project replaces files and folders, with one behaviour on every OS.
/// Linux renames over a file that another process holds open or memory-mapped, at once and atomically. Windows refuses
/// (a sharing violation, "access denied", or ERROR_USER_MAPPED_FILE) while any other handle is open on it without
/// FILE_SHARE_DELETE: an antivirus scan, the search indexer, a backup agent, an editor; these usually let go within
/// milliseconds. So on Windows each operation is retried with a bounded backoff (10 ms doubling, capped at 1 s,
/// about 4.3 s in all) before the error is reported with the path and what to do; elsewhere it runs once, unchanged.
/// <c>File.Move(overwrite: true)</c> is MoveFileEx with MOVEFILE_REPLACE_EXISTING on Windows: within one volume it
/// replaces the target in one step, as rename(2) does. The project's own memory maps are closed before the files they
/// map are renamed or deleted (see SafetensorsReader, OptimizerStateMemory): a retry cannot wait those out.
/// </summary>
public static class FileReplace
{
    /// <summary>Renames <paramref name="source"/> over <paramref name="target"/> (replacing it when present).</summary>
    public static void ReplaceFile(string source, string target) => Run(() => File.Move(source, target, overwrite: true), target, "replace");

    /// <summary>Renames a file (the target must not exist).</summary>
    public static void MoveFile(string source, string target) => Run(() => File.Move(source, target), source, "move");

    /// <summary>Renames a folder (the target must not exist).</summary>
    public static void MoveDirectory(string source, string target) => Run(() => Directory.Move(source, target), source, "move");

    /// <summary>Deletes a folder and everything in it.</summary>
    public static void DeleteDirectory(string path) => Run(() => Directory.Delete(path, recursive: true), path, "delete");

    /// <summary>Deletes a file.</summary>
    public static void DeleteFile(string path) => Run(() => File.Delete(path), path, "delete");

    /// <summary>The waits between attempts on Windows: 10, 20, 40, ... ms capped at 1 s, 10 of them (about 4.3 s).</summary>
    public static IReadOnlyList<TimeSpan> Backoff { get; } =
        Enumerable.Range(0, 10).Select(i => TimeSpan.FromMilliseconds(Math.Min(1000, 10 << i))).ToArray();

    /// <summary>
    /// Runs <paramref name="operation"/>; when <paramref name="retry"/> (default: on Windows) and it fails with a
    /// transient sharing error, waits each <see cref="Backoff"/> step and tries again, then reports the last error
    /// naming <paramref name="path"/>. Other errors, and every error without retry, propagate unchanged.
    /// </summary>
    internal static void Run(Action operation, string path, string verb, bool? retry = null, Action<TimeSpan>? sleep = null)
    {
        if (!(retry ?? OperatingSystem.IsWindows()))
        {
            operation();
            return;
        }
        sleep ??= Thread.Sleep;
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                operation();
                return;
            }
            catch (Exception e) when (IsTransient(e))
            {
                if (attempt == Backoff.Count)
                    throw new IOException($"{path}: could not {verb} it: {e.Message.TrimEnd('.')} (still in use after {Backoff.Sum(t => t.TotalSeconds):0.#} s of retries); " +
                        "close the program holding it (an editor, a file viewer, another qlora) or exclude the folder from antivirus scans, and run again", e);
                sleep(Backoff[attempt]);
            }
        }
    }

    /// <summary>
    /// The Windows errors that another process's open handle causes and that clear when it closes: sharing violation
    /// (32), lock violation (33), access denied (5: also a file pending deletion), directory not empty (145: a file in
    /// it pending deletion), user-mapped section open (1224).
    /// </summary>
    internal static bool IsTransient(Exception e) => e switch
    {
        UnauthorizedAccessException => true,
        IOException io when io is not FileNotFoundException and not DirectoryNotFoundException =>
            (io.HResult & 0xFFFF) is 5 or 32 or 33 or 145 or 1224,
        _ => false,
    };
}
