using System.Runtime.InteropServices;

namespace QLora.Kernels;

/// <summary>
/// NVIDIA's collective communication library (NCCL), bound at run time: nothing at build time and nothing loaded by a
/// job that does not need it. Data-parallel training on CUDA ranks sums the LoRA gradients with it device to device
/// instead of staging them through host memory. It is found where a PyTorch installation keeps it
/// (<c>site-packages/nvidia/nccl/lib</c>, next to <c>torch/lib</c>; already mapped when torch's CUDA libraries are),
/// on the loader path (<c>libnccl.so.2</c>), or at <c>QLORA_NCCL</c>. Only what an all-reduce of gradients needs is
/// bound: unique id, communicator init/abort/destroy, all-reduce, asynchronous errors, version.
/// </summary>
public sealed unsafe class NcclLibrary
{
    /// <summary>Bytes of an <c>ncclUniqueId</c> (<c>NCCL_UNIQUE_ID_BYTES</c>): what rank 0 sends every other rank.</summary>
    public const int UniqueIdBytes = 128;
    /// <summary><c>ncclSuccess</c>.</summary>
    public const int Success = 0;
    /// <summary><c>ncclInProgress</c>: a non-blocking call has not finished (not an error).</summary>
    public const int InProgress = 7;
    /// <summary><c>ncclFloat32</c>.</summary>
    public const int Float32 = 7;
    /// <summary><c>ncclSum</c>.</summary>
    public const int Sum = 0;

    /// <summary>The environment variable naming the library file to use (or <see cref="OffValue"/>).</summary>
    public const string PathVariable = "QLORA_NCCL";
    /// <summary><c>QLORA_NCCL=off</c>: load no NCCL (CUDA ranks then sum their gradients through host memory over MPI).</summary>
    public const string OffValue = "off";

    readonly delegate* unmanaged<int*, int> _getVersion;
    readonly delegate* unmanaged<UniqueId*, int> _getUniqueId;
    readonly delegate* unmanaged<nint*, int, UniqueId, int, int> _commInitRank;
    readonly delegate* unmanaged<nint, nint, nuint, int, int, nint, nint, int> _allReduce;
    readonly delegate* unmanaged<nint, int*, int> _commGetAsyncError;
    readonly delegate* unmanaged<nint, int> _commAbort;
    readonly delegate* unmanaged<nint, int> _commDestroy;
    readonly delegate* unmanaged<int, byte*> _getErrorString;

    /// <summary>Where the library came from (the file or name it was loaded by).</summary>
    public string Source { get; }

    /// <summary>The library's version code as NCCL reports it (e.g. 22705 for 2.27.5).</summary>
    public int VersionCode { get; }

    /// <summary>The version as major.minor.patch.</summary>
    public string Version => FormatVersion(VersionCode);

    /// <summary>NCCL's <c>ncclUniqueId</c>: 128 opaque bytes, passed by value to <c>ncclCommInitRank</c>.</summary>
    [StructLayout(LayoutKind.Sequential)]
    struct UniqueId
    {
        public fixed byte Bytes[UniqueIdBytes];
    }

    /// <summary>
    /// Binds the library through <paramref name="export"/> (a symbol name → its address, zero when missing); tests bind
    /// managed stand-ins this way.
    /// </summary>
    internal NcclLibrary(Func<string, nint> export, string source)
    {
        Source = source;
        nint F(string symbol) => export(symbol) is var p && p != 0 ? p
            : throw new InvalidOperationException($"{source} has no {symbol}: NCCL 2.12 or newer is required");
        _getVersion = (delegate* unmanaged<int*, int>)F("ncclGetVersion");
        _getUniqueId = (delegate* unmanaged<UniqueId*, int>)F("ncclGetUniqueId");
        _commInitRank = (delegate* unmanaged<nint*, int, UniqueId, int, int>)F("ncclCommInitRank");
        _allReduce = (delegate* unmanaged<nint, nint, nuint, int, int, nint, nint, int>)F("ncclAllReduce");
        _commGetAsyncError = (delegate* unmanaged<nint, int*, int>)F("ncclCommGetAsyncError");
        _commAbort = (delegate* unmanaged<nint, int>)F("ncclCommAbort");
        _commDestroy = (delegate* unmanaged<nint, int>)F("ncclCommDestroy");
        _getErrorString = (delegate* unmanaged<int, byte*>)F("ncclGetErrorString");
        int code = 0;
        Check(_getVersion(&code), "ncclGetVersion");
        VersionCode = code;
    }

    /// <summary>
    /// The files and names tried in order: <paramref name="ownPath"/> (<c>QLORA_NCCL</c>) alone when set; else pip's
    /// <c>nvidia/nccl/lib/libnccl.so.2</c> beside each of <paramref name="torchLibFolders"/> (a PyTorch installation's
    /// <c>torch/lib</c>), then the loader's <c>libnccl.so.2</c> and <c>libnccl.so</c>. NCCL exists for Linux only.
    /// </summary>
    public static IReadOnlyList<string> Candidates(string? ownPath, IEnumerable<string> torchLibFolders)
    {
        if (!string.IsNullOrWhiteSpace(ownPath)) return [ownPath];
        if (!OperatingSystem.IsLinux()) return [];
        var list = new List<string>();
        foreach (var folder in torchLibFolders)
            list.Add(Path.GetFullPath(Path.Combine(folder, "..", "..", "nvidia", "nccl", "lib", "libnccl.so.2")));
        list.Add("libnccl.so.2");
        list.Add("libnccl.so");
        return [.. list.Distinct(StringComparer.Ordinal)];
    }

    /// <summary>
    /// Loads NCCL from the first of <see cref="Candidates"/> that loads, or returns null with <paramref name="reason"/>
    /// saying what was tried and what to do.
    /// </summary>
    public static NcclLibrary? TryLoad(IEnumerable<string> torchLibFolders, out string? reason)
    {
        var own = Environment.GetEnvironmentVariable(PathVariable);
        if (string.Equals(own, OffValue, StringComparison.OrdinalIgnoreCase))
        {
            reason = $"{PathVariable}={OffValue}";
            return null;
        }
        var candidates = Candidates(own, torchLibFolders);
        if (candidates.Count == 0)
        {
            reason = "NCCL exists for Linux only";
            return null;
        }
        foreach (var name in candidates)
        {
            if (name.Contains('/') && !File.Exists(name)) continue;
            if (!NativeLibrary.TryLoad(name, out var handle)) continue;
            try
            {
                reason = null;
                return new NcclLibrary(symbol => NativeLibrary.TryGetExport(handle, symbol, out var p) ? p : 0, name);
            }
            catch (Exception e) when (e is InvalidOperationException or NcclException)
            {
                reason = e.Message;
                return null;
            }
        }
        reason = string.IsNullOrWhiteSpace(own)
            ? $"no NCCL library found (tried {string.Join(", ", candidates)}); pip install nvidia-nccl-cu12 (or the CUDA 13 one), or point {PathVariable} at libnccl.so.2"
            : $"{PathVariable}={own} could not be loaded (missing, or not a shared library for this machine); point it at libnccl.so.2";
        return null;
    }

    /// <summary>A new unique id (on the rank that creates the communicator; the others receive it).</summary>
    public byte[] NewUniqueId()
    {
        UniqueId id;
        Check(_getUniqueId(&id), "ncclGetUniqueId");
        return new ReadOnlySpan<byte>(id.Bytes, UniqueIdBytes).ToArray();
    }

    /// <summary>
    /// Joins the communicator of <paramref name="ranks"/> ranks named by <paramref name="uniqueId"/> as
    /// <paramref name="rank"/>, on the CUDA device current on this thread; returns once every rank has joined.
    /// </summary>
    public nint InitRank(int ranks, ReadOnlySpan<byte> uniqueId, int rank)
    {
        if (uniqueId.Length != UniqueIdBytes) throw new ArgumentException($"an NCCL unique id has {UniqueIdBytes} bytes, not {uniqueId.Length}", nameof(uniqueId));
        UniqueId id;
        uniqueId.CopyTo(new Span<byte>(id.Bytes, UniqueIdBytes));
        nint comm;
        Check(_commInitRank(&comm, ranks, id, rank), "ncclCommInitRank");
        return comm;
    }

    /// <summary>
    /// Queues a float32 sum over all ranks of <paramref name="count"/> elements at <paramref name="send"/> into
    /// <paramref name="receive"/> (the same address for in place) on <paramref name="stream"/> (0: the legacy default
    /// stream, torch's); the host does not wait.
    /// </summary>
    public void AllReduceSumFloat32(nint send, nint receive, long count, nint comm, nint stream) =>
        Check(_allReduce(send, receive, checked((nuint)count), Float32, Sum, comm, stream), "ncclAllReduce");

    /// <summary>The communicator's asynchronous error (<see cref="Success"/>, <see cref="InProgress"/> or an error code).</summary>
    public int AsyncError(nint comm)
    {
        int state = Success;
        Check(_commGetAsyncError(comm, &state), "ncclCommGetAsyncError");
        return state;
    }

    /// <summary>Stops the communicator's pending operations and frees it (after an error or a timeout).</summary>
    public int Abort(nint comm) => _commAbort(comm);

    /// <summary>Frees the communicator once its queued operations have completed.</summary>
    public void Destroy(nint comm) => Check(_commDestroy(comm), "ncclCommDestroy");

    /// <summary>NCCL's words for a result code.</summary>
    public string ErrorString(int result)
    {
        var p = _getErrorString(result);
        return p == null ? $"NCCL error {result}" : Marshal.PtrToStringUTF8((nint)p) ?? $"NCCL error {result}";
    }

    /// <summary>Throws <see cref="NcclException"/> naming <paramref name="call"/> unless <paramref name="result"/> is success.</summary>
    public void Check(int result, string call)
    {
        if (result != Success) throw new NcclException(call, result, ErrorString(result));
    }

    /// <summary>major.minor.patch from NCCL's version code (X·1000 + Y·100 + Z up to 2.8, X·10000 + Y·100 + Z since 2.9).</summary>
    public static string FormatVersion(int code) => code < 20900
        ? $"{code / 1000}.{code % 1000 / 100}.{code % 100}"
        : $"{code / 10000}.{code % 10000 / 100}.{code % 100}";
}
