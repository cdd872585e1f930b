using System.CommandLine;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>The device options verbs share: <c>--device</c> and <c>--emulate-vram</c>, with the same names and help everywhere.</summary>
internal static class DeviceOptions
{
    /// <summary><c>--device auto|cpu|cuda|cuda:N</c> (default auto).</summary>
    public static Option<string> Device(string? what = null) => new("--device")
    {
        Description = what ?? $"where to compute: {DeviceRequest.Allowed}",
        DefaultValueFactory = _ => "auto",
    };

    /// <summary><c>--emulate-vram SIZE</c>: take the rest of a larger CUDA card away before loading.</summary>
    public static Option<string?> EmulateVram() => new("--emulate-vram")
    {
        Description = "behave like a CUDA card of this size (e.g. 24GB): the rest of a larger card is allocated away before loading",
    };

    /// <summary>Takes the card down to the <c>--emulate-vram</c> size when one was given (null otherwise), reporting what was taken.</summary>
    public static DeviceMemoryReservation? Emulate(ComputeDevice device, string? size, TextWriter stdout)
    {
        if (string.IsNullOrWhiteSpace(size)) return null;
        if (!ByteSize.TryParse(size, out long bytes) || bytes <= 0)
            throw new ArgumentException($"--emulate-vram '{size}': a size such as 24GB, 16GiB or 8000MB");
        var reservation = device.EmulateCapacity(bytes, $"--emulate-vram {size}");
        stdout.WriteLine($"emulating a {ByteSize.Format(bytes)} card on {device.Name}: {ByteSize.Format(reservation.Bytes)} allocated away before loading");
        return reservation;
    }
}
