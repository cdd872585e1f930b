using System.Runtime.InteropServices;
using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// The ways a user or the system asks a training run to stop, mapped to one cancellation: the run saves a checkpoint
/// at the end of the step and exits. The same code on every OS, through .NET's signal mapping:
/// <list type="bullet">
/// <item>Ctrl-C (SIGINT; Windows CTRL_C_EVENT) and Ctrl-Break / Ctrl-\ (SIGQUIT; Windows CTRL_BREAK_EVENT), through
/// <see cref="Console.CancelKeyPress"/>: the first saves and stops, a second aborts at once without saving.</item>
/// <item>SIGTERM (Windows: CTRL_SHUTDOWN_EVENT) and SIGHUP (the terminal went away; Windows: CTRL_CLOSE_EVENT, the
/// console window was closed): save and stop.</item>
/// </list>
/// Windows ends a process a few seconds after its handler for a close, log-off or shutdown event returns, whatever
/// it returns (5 s for a closed console window). So there the handler waits, up to <see cref="WindowsGrace"/>, for the
/// run to finish its step and write the checkpoint; a step that takes longer is lost, the checkpoints already written
/// stay complete (they are written atomically), and <c>--resume latest</c> continues from the newest.
/// </summary>
internal sealed class StopSignals : IDisposable
{
    /// <summary>How long a Windows close or shutdown handler waits for the checkpoint (Windows allows about 5 s).</summary>
    public static readonly TimeSpan WindowsGrace = TimeSpan.FromSeconds(QLora.Trainer.Runtime.PlatformFacts.StopGraceSeconds);

    readonly CancellationTokenSource _cts = new();
    readonly ManualResetEventSlim _finished = new();
    readonly ConsoleCancelEventHandler _onCancel;
    readonly PosixSignalRegistration[] _registrations;

    /// <summary>Starts listening; <paramref name="abort"/> runs on a second Ctrl-C (it should end the process).</summary>
    public StopSignals(Action abort)
    {
        _onCancel = (_, e) =>
        {
            e.Cancel = true;
            if (_cts.IsCancellationRequested) abort();
            Console.Error.WriteLine("qlora train: interrupted; saving a checkpoint at the end of this step (press Ctrl-C again to abort without saving)");
            _cts.Cancel();
        };
        Console.CancelKeyPress += _onCancel;
        _registrations =
        [
            PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnTerminate),
            PosixSignalRegistration.Create(PosixSignal.SIGHUP, OnTerminate),
        ];
    }

    /// <summary>Cancelled when a stop was asked for.</summary>
    public CancellationToken Token => _cts.Token;

    void OnTerminate(PosixSignalContext context)
    {
        context.Cancel = true;
        if (!_cts.IsCancellationRequested)
            Console.Error.WriteLine($"qlora train: {context.Signal} received; saving a checkpoint at the end of this step");
        _cts.Cancel();
        // Windows terminates the process when this handler returns: hold it until the run has saved, within the grace.
        if (OperatingSystem.IsWindows()) _finished.Wait(WindowsGrace);
    }

    /// <summary>Call when the run has ended (saved or not): releases a waiting Windows close handler.</summary>
    public void RunFinished() => _finished.Set();

    /// <inheritdoc />
    public void Dispose()
    {
        RunFinished();
        Console.CancelKeyPress -= _onCancel;
        foreach (var r in _registrations) r.Dispose();
        _cts.Dispose();
        // _finished is left to the GC: a Windows close handler may still be returning from its wait.
    }
}
