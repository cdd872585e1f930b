using System.Globalization;

namespace QLora.Trainer;

/// <summary>What a device setting asks for, before anything is looked up: <c>auto</c>, <c>cpu</c>, <c>cuda</c> or <c>cuda:N</c>.</summary>
/// <param name="Kind">auto, cpu or cuda.</param>
/// <param name="Ordinal">The CUDA device number (0 for plain <c>cuda</c>), or -1 for auto and cpu.</param>
public sealed record DeviceRequest(DeviceRequestKind Kind, int Ordinal)
{
    /// <summary>The values a device setting accepts, for messages.</summary>
    public const string Allowed = "auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N";

    /// <summary>
    /// False for plain <c>cuda</c> (no device number given): under an MPI launcher each rank then takes the device of its
    /// local rank (see <see cref="DeviceSelector"/>), as <c>cuda:N</c> and the CPU never do.
    /// </summary>
    public bool Indexed { get; init; } = true;

    /// <summary>The default: the first usable CUDA device, else the CPU.</summary>
    public static DeviceRequest Auto { get; } = new(DeviceRequestKind.Auto, -1);

    /// <summary>Parses a device name (case-insensitive, PyTorch's spelling); false for anything else.</summary>
    public static bool TryParse(string? text, out DeviceRequest request)
    {
        request = Auto;
        var s = text?.Trim().ToLowerInvariant();
        switch (s)
        {
            case null or "" or "auto": return true;
            case "cpu": request = new(DeviceRequestKind.Cpu, -1); return true;
            case "cuda" or "gpu": request = new(DeviceRequestKind.Cuda, 0) { Indexed = false }; return true;
        }
        if (s.StartsWith("cuda:", StringComparison.Ordinal)
            && int.TryParse(s.AsSpan(5), NumberStyles.None, CultureInfo.InvariantCulture, out int n) && n < 1024)
        {
            request = new(DeviceRequestKind.Cuda, n);
            return true;
        }
        return false;
    }

    /// <summary>Parses or throws <see cref="ArgumentException"/> naming <paramref name="what"/> (e.g. <c>--device</c>) and the allowed values.</summary>
    public static DeviceRequest Parse(string? text, string what) =>
        TryParse(text, out var r) ? r : throw new ArgumentException($"{what} '{text}': allowed values are {Allowed}");

    /// <inheritdoc />
    public override string ToString() => Kind switch
    {
        DeviceRequestKind.Auto => "auto",
        DeviceRequestKind.Cpu => "cpu",
        _ => $"cuda:{Ordinal}",
    };
}

/// <summary>The three kinds of device setting.</summary>
public enum DeviceRequestKind
{
    /// <summary>The first usable CUDA device, else the CPU.</summary>
    Auto,
    /// <summary>The CPU backend.</summary>
    Cpu,
    /// <summary>A CUDA device.</summary>
    Cuda,
}
