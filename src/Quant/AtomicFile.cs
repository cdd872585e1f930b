namespace QLora.Quant;

/// <summary>Replaces small files atomically: write a temporary file in the same folder, flush it to disk, rename it over the target.</summary>
public static class AtomicFile
{
    /// <summary>Writes <paramref name="bytes"/> to <paramref name="path"/> so readers see either the old file or the complete new one.</summary>
    public static void WriteAllBytes(string path, ReadOnlySpan<byte> bytes)
    {
        string full = Path.GetFullPath(path);
        string temp = WriteLeftovers.TempPathFor(full);
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                stream.Write(bytes);
                stream.Flush(flushToDisk: true);
            }
            FileReplace.ReplaceFile(temp, full);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    /// <summary>
    /// Closes and deletes a temporary file a writer abandons (an error before its commit). Its buffered bytes are
    /// dropped: on a full disk flushing them fails again, and that failure must neither replace the first one nor keep
    /// the file (and the space it holds) on the disk.
    /// </summary>
    internal static void Abandon(Stream? stream, string tempPath)
    {
        try { stream?.Dispose(); }
        catch (IOException) { }
        TryDelete(tempPath);
    }

    /// <summary>Deletes a temporary file this project wrote, ignoring a failure (cleanup must not hide the real error).</summary>
    internal static void TryDelete(string path)
    {
        try { File.Delete(path); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }
}
