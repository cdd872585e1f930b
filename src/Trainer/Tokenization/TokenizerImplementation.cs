using System.Runtime.InteropServices;

namespace QLora.Trainer;

/// <summary>Which tokenizer implementation runs tokenizer.json.</summary>
public enum TokenizerImplementation
{
    /// <summary>The native library where it is available (linux-x64), else the managed one.</summary>
    Auto,

    /// <summary>The managed implementation (every OS): BPE tokenizers (byte-level and SentencePiece-style).</summary>
    Managed,

    /// <summary>Hugging Face's Rust tokenizers through Tokenizers.DotNet (published for linux-x64 only).</summary>
    Native,
}

/// <summary>Reads the tokenizer choice of the process: <c>QLORA_TOKENIZER=auto|managed|native</c>.</summary>
public static class TokenizerSelection
{
    /// <summary>The environment variable (a process setting, not a job key: it has no <c>__</c>).</summary>
    public const string EnvironmentVariable = "QLORA_TOKENIZER";

    /// <summary>The choice named by <see cref="EnvironmentVariable"/>; <see cref="TokenizerImplementation.Auto"/> when unset.</summary>
    /// <exception cref="ArgumentException">The variable holds something other than auto, managed or native.</exception>
    public static TokenizerImplementation FromEnvironment() => Parse(Environment.GetEnvironmentVariable(EnvironmentVariable));

    /// <summary>A value of <see cref="EnvironmentVariable"/> read as a choice (case-insensitive; empty is auto).</summary>
    /// <exception cref="ArgumentException">Something other than auto, managed or native.</exception>
    public static TokenizerImplementation Parse(string? value)
    {
        if (string.IsNullOrWhiteSpace(value))
            return TokenizerImplementation.Auto;
        return value.Trim().ToLowerInvariant() switch
        {
            "auto" => TokenizerImplementation.Auto,
            "managed" => TokenizerImplementation.Managed,
            "native" => TokenizerImplementation.Native,
            _ => throw new ArgumentException($"{EnvironmentVariable}='{value}' is not a tokenizer choice: use auto, managed or native."),
        };
    }

    /// <summary>Whether the native library is published for this process's platform (Tokenizers.DotNet.runtime.linux-x64).</summary>
    public static bool NativePlatform => OperatingSystem.IsLinux() && RuntimeInformation.ProcessArchitecture == Architecture.X64;
}
