namespace QLora.Quant.Tests;

/// The Windows retry policy of FileReplace, driven on any OS with simulated Windows errors (HRESULT 0x8007xxxx).
public class FileReplaceTests
{
    static IOException WindowsError(int code) => new("simulated") { HResult = unchecked((int)0x80070000) | code };

    [Theory]
    [InlineData(32)]   // ERROR_SHARING_VIOLATION: an antivirus scan or an editor has the file open
    [InlineData(33)]   // ERROR_LOCK_VIOLATION
    [InlineData(1224)] // ERROR_USER_MAPPED_FILE: a memory map of it is open
    public void ATransientSharingErrorIsRetriedUntilTheOperationSucceeds(int code)
    {
        int calls = 0;
        var waits = new List<TimeSpan>();
        FileReplace.Run(() => { if (++calls < 4) throw WindowsError(code); }, "x", "replace", retry: true, sleep: waits.Add);
        Assert.Equal(4, calls);
        Assert.Equal([10, 20, 40], waits.Select(w => w.TotalMilliseconds));
    }

    [Fact]
    public void AHolderThatNeverLetsGoEndsInOneErrorNamingThePathAfterABoundedWait()
    {
        int calls = 0;
        var waits = new List<TimeSpan>();
        var e = Assert.Throws<IOException>(() =>
            FileReplace.Run(() => { calls++; throw new UnauthorizedAccessException("Access to the path is denied."); }, @"C:\out\adapter_model.safetensors", "replace", retry: true, sleep: waits.Add));
        Assert.Equal(11, calls); // the first try and 10 retries
        Assert.Equal(10, waits.Count);
        Assert.True(waits.Max() <= TimeSpan.FromSeconds(1));
        Assert.InRange(waits.Sum(w => w.TotalSeconds), 4, 5); // 10+20+...+640 ms, then 3 x 1 s
        Assert.StartsWith(@"C:\out\adapter_model.safetensors: could not replace it", e.Message);
        Assert.Contains("close the program holding it", e.Message);
        Assert.IsType<UnauthorizedAccessException>(e.InnerException);
    }

    [Fact]
    public void OtherErrorsAndEveryErrorWithoutRetryPropagateAtOnceUnchanged()
    {
        int calls = 0;
        var missing = new FileNotFoundException("gone");
        Assert.Same(missing, Assert.Throws<FileNotFoundException>(() => FileReplace.Run(() => { calls++; throw missing; }, "x", "move", retry: true, sleep: _ => { })));
        var full = WindowsError(112); // ERROR_DISK_FULL: waiting does not help
        Assert.Same(full, Assert.Throws<IOException>(() => FileReplace.Run(() => { calls++; throw full; }, "x", "move", retry: true, sleep: _ => { })));
        var sharing = WindowsError(32);
        Assert.Same(sharing, Assert.Throws<IOException>(() => FileReplace.Run(() => { calls++; throw sharing; }, "x", "move", retry: false, sleep: _ => throw new Exception("no wait without retry"))));
        Assert.Equal(3, calls);
    }

    [Fact]
    public void ReplaceFileSwapsInTheNewContentAndLeavesNoSourceBehind()
    {
        using var dir = new TempDirectory();
        string target = dir.File("a.json"), source = dir.File("a.json.tmp");
        File.WriteAllText(target, "old");
        File.WriteAllText(source, "new");
        FileReplace.ReplaceFile(source, target);
        Assert.Equal("new", File.ReadAllText(target));
        Assert.False(File.Exists(source));
        Directory.CreateDirectory(dir.File("stage"));
        File.WriteAllText(Path.Combine(dir.File("stage"), "f"), "x");
        FileReplace.MoveDirectory(dir.File("stage"), dir.File("final"));
        Assert.Equal("x", File.ReadAllText(Path.Combine(dir.File("final"), "f")));
        FileReplace.DeleteDirectory(dir.File("final"));
        Assert.False(Directory.Exists(dir.File("final")));
    }
}
