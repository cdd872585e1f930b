using System.Runtime.InteropServices;
using System.Text;

namespace QLora.Trainer;

/// <summary>
/// The MPI C API, bound at run time from the MPI library the job was launched with (no MPI at build time, and nothing
/// loaded by a job that does not run under MPI). The C API is standard but its handles are not: Open MPI's predefined
/// handles are the addresses of exported globals (<c>MPI_COMM_WORLD</c> = <c>&amp;ompi_mpi_comm_world</c>), MPICH and
/// its derivatives (Intel MPI, MS-MPI, Cray MPICH) use integer constants; which one this is comes from
/// <c>MPI_Get_library_version</c>. Handles are passed as pointer-sized integers, which both ABIs accept.
/// </summary>
internal sealed unsafe class MpiLibrary
{
    /// <summary>The library's own version line.</summary>
    public string Version { get; }
    /// <summary>Open MPI (handles are addresses) rather than the MPICH family (handles are integers).</summary>
    public bool IsOpenMpi { get; }
    public nint CommWorld { get; }
    public nint Float { get; }
    public nint Double { get; }
    public nint Byte { get; }
    public nint Int { get; }
    public nint OpSum { get; }
    /// <summary>MPI_IN_PLACE: (void*)1 in Open MPI, (void*)-1 in MPICH.</summary>
    public nint InPlace { get; }

    public readonly delegate* unmanaged<int*, byte***, int> Init;
    public readonly delegate* unmanaged<int*, int> Initialized;
    public readonly delegate* unmanaged<int> Finalize;
    public readonly delegate* unmanaged<nint, int*, int> CommRank;
    public readonly delegate* unmanaged<nint, int*, int> CommSize;
    public readonly delegate* unmanaged<nint, nint, int, nint, nint, nint, long*, int> Iallreduce;
    public readonly delegate* unmanaged<nint, int, nint, int, nint, long*, int> Ibcast;
    public readonly delegate* unmanaged<nint, long*, int> Ibarrier;
    public readonly delegate* unmanaged<nint, int, nint, nint, int, nint, nint, long*, int> Iallgather;
    public readonly delegate* unmanaged<nint, int, nint, int, int, nint, long*, int> Isend;
    public readonly delegate* unmanaged<nint, int, nint, int, int, nint, long*, int> Irecv;
    public readonly delegate* unmanaged<long*, int*, void*, int> Test;

    /// <summary>Library names tried in order (QLORA_MPI_LIBRARY first when set).</summary>
    static IEnumerable<string> Candidates()
    {
        if (Environment.GetEnvironmentVariable("QLORA_MPI_LIBRARY") is { Length: > 0 } own) yield return own;
        if (OperatingSystem.IsWindows()) { yield return "msmpi.dll"; yield return "impi.dll"; yield break; }
        yield return "libmpi.so.40"; // Open MPI 3.x-5.x
        yield return "libmpi.so.12"; // MPICH 3.x-4.x, Intel MPI, Cray MPICH
        yield return "libmpi.so";
        yield return "libmpi.dylib";
    }

    /// <summary>Loads the MPI library; a job under an MPI launcher without a loadable library is an error saying what to install.</summary>
    public static MpiLibrary Load()
    {
        foreach (var name in Candidates())
            if (NativeLibrary.TryLoad(name, out var handle)) return new MpiLibrary(handle, name);
        throw new InvalidOperationException("this process was launched by an MPI launcher but no MPI library could be loaded (tried " +
            string.Join(", ", Candidates()) + "); install the MPI runtime the launcher belongs to (Debian: apt-get install openmpi-bin libopenmpi-dev), " +
            "point QLORA_MPI_LIBRARY at its libmpi, or set Training:DataParallel off");
    }

    MpiLibrary(nint lib, string name)
    {
        nint F(string symbol) => NativeLibrary.TryGetExport(lib, symbol, out var p) ? p
            : throw new InvalidOperationException($"{name} has no {symbol}: an MPI library implementing MPI-3 is required (or set Training:DataParallel off)");
        var version = (delegate* unmanaged<byte*, int*, int>)F("MPI_Get_library_version");
        var text = new byte[8192]; // MPI_MAX_LIBRARY_VERSION_STRING is 256 in Open MPI, 8192 in MPICH
        int length = 0;
        fixed (byte* t = text) version(t, &length);
        Version = Encoding.UTF8.GetString(text, 0, Math.Clamp(length, 0, text.Length)).Trim('\0', ' ', '\n', '\r', '\t').Split('\n')[0].Split(',')[0].Trim();
        IsOpenMpi = Version.Contains("Open MPI", StringComparison.OrdinalIgnoreCase);
        bool mpichFamily = Version.Contains("MPICH", StringComparison.OrdinalIgnoreCase) || Version.Contains("Intel", StringComparison.OrdinalIgnoreCase)
            || Version.Contains("Microsoft MPI", StringComparison.OrdinalIgnoreCase) || Version.Contains("MVAPICH", StringComparison.OrdinalIgnoreCase);
        if (IsOpenMpi)
        {
            CommWorld = F("ompi_mpi_comm_world");
            Float = F("ompi_mpi_float");
            Double = F("ompi_mpi_double");
            Byte = F("ompi_mpi_byte");
            Int = F("ompi_mpi_int");
            OpSum = F("ompi_mpi_op_sum");
            InPlace = 1;
        }
        else if (mpichFamily)
        {
            // mpi.h of MPICH (and the ABI-compatible Intel MPI, MVAPICH, MS-MPI).
            CommWorld = 0x44000000;
            Float = 0x4c00040a;
            Double = 0x4c00080b;
            Byte = 0x4c00010d;
            Int = 0x4c000405;
            OpSum = 0x58000003;
            InPlace = -1;
        }
        else throw new NotSupportedException($"{name} reports '{Version}': only Open MPI and the MPICH family (MPICH, Intel MPI, MVAPICH, MS-MPI) are supported");

        Init = (delegate* unmanaged<int*, byte***, int>)F("MPI_Init");
        Initialized = (delegate* unmanaged<int*, int>)F("MPI_Initialized");
        Finalize = (delegate* unmanaged<int>)F("MPI_Finalize");
        CommRank = (delegate* unmanaged<nint, int*, int>)F("MPI_Comm_rank");
        CommSize = (delegate* unmanaged<nint, int*, int>)F("MPI_Comm_size");
        Iallreduce = (delegate* unmanaged<nint, nint, int, nint, nint, nint, long*, int>)F("MPI_Iallreduce");
        Ibcast = (delegate* unmanaged<nint, int, nint, int, nint, long*, int>)F("MPI_Ibcast");
        Ibarrier = (delegate* unmanaged<nint, long*, int>)F("MPI_Ibarrier");
        Iallgather = (delegate* unmanaged<nint, int, nint, nint, int, nint, nint, long*, int>)F("MPI_Iallgather");
        Isend = (delegate* unmanaged<nint, int, nint, int, int, nint, long*, int>)F("MPI_Isend");
        Irecv = (delegate* unmanaged<nint, int, nint, int, int, nint, long*, int>)F("MPI_Irecv");
        Test = (delegate* unmanaged<long*, int*, void*, int>)F("MPI_Test");
    }
}
