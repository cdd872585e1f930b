// MSBuild inline task (RoslynCodeTaskFactory): marks one version requirement of an ELF64 shared object weak.
// Kept dependency-free so it compiles inside MSBuild on any machine.
using System;
using System.IO;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

public class QLoraWeakenElfVersionNeed : Task
{
    [Required] public ITaskItem[] Files { get; set; }
    [Required] public string VersionName { get; set; }
    /// <summary>auto: only where the system libstdc++ lacks the version; force: always.</summary>
    [Required] public string Mode { get; set; }

    static readonly string[] LibStdCxxCandidates =
    {
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/lib/aarch64-linux-gnu/libstdc++.so.6", "/lib/aarch64-linux-gnu/libstdc++.so.6",
        "/usr/lib64/libstdc++.so.6", "/lib64/libstdc++.so.6", "/usr/lib/libstdc++.so.6", "/lib/libstdc++.so.6",
    };

    public override bool Execute()
    {
        if (Mode == "auto" && SystemHasVersion())
        {
            Log.LogMessage(MessageImportance.Low, "System libstdc++ provides " + VersionName + "; libLibTorchSharp.so left as shipped.");
            return true;
        }
        foreach (var item in Files)
        {
            var path = item.ItemSpec;
            try
            {
                var bytes = File.ReadAllBytes(path);
                int changed = Weaken(bytes, VersionName);
                if (changed < 0) { Log.LogMessage(MessageImportance.Low, path + ": not an ELF64 little-endian file with .gnu.version_r; left alone."); continue; }
                if (changed == 0) continue;
                var tmp = path + ".qlora-tmp";
                File.WriteAllBytes(tmp, bytes);
                File.Replace(tmp, path, null); // a new inode: never writes through a hard link into the NuGet cache
                Log.LogMessage(MessageImportance.High, "Marked " + VersionName + " weak in " + path + " (system libstdc++ lacks it).");
            }
            catch (Exception e)
            {
                Log.LogWarning("Could not patch " + path + " for " + VersionName + ": " + e.Message);
            }
        }
        return !Log.HasLoggedErrors;
    }

    bool SystemHasVersion()
    {
        var needle = Encoding.ASCII.GetBytes(VersionName + "\0");
        foreach (var c in LibStdCxxCandidates)
        {
            if (!File.Exists(c)) continue;
            var data = File.ReadAllBytes(c);
            if (IndexOf(data, needle) >= 0) return true;
            return false; // the first libstdc++ found is the one the loader uses
        }
        return false;
    }

    static int IndexOf(byte[] hay, byte[] needle)
    {
        for (int i = 0; i + needle.Length <= hay.Length; i++)
        {
            int j = 0;
            while (j < needle.Length && hay[i + j] == needle[j]) j++;
            if (j == needle.Length) return i;
        }
        return -1;
    }

    /// <summary>Returns the number of entries newly marked weak, or -1 if the file has no version-needs section.</summary>
    public static int Weaken(byte[] b, string name)
    {
        if (b.Length < 64 || b[0] != 0x7F || b[1] != (byte)'E' || b[2] != (byte)'L' || b[3] != (byte)'F' || b[4] != 2 || b[5] != 1) return -1;
        long shoff = BitConverter.ToInt64(b, 0x28);
        int shentsize = BitConverter.ToUInt16(b, 0x3A), shnum = BitConverter.ToUInt16(b, 0x3C);
        if (shoff <= 0 || shentsize < 64 || shoff + (long)shentsize * shnum > b.Length) return -1;
        const uint SHT_GNU_verneed = 0x6ffffffe;
        int changed = 0; bool found = false;
        for (int s = 0; s < shnum; s++)
        {
            long sh = shoff + (long)s * shentsize;
            if (BitConverter.ToUInt32(b, (int)sh + 4) != SHT_GNU_verneed) continue;
            found = true;
            long off = BitConverter.ToInt64(b, (int)sh + 0x18);
            uint link = BitConverter.ToUInt32(b, (int)sh + 0x28);
            uint count = BitConverter.ToUInt32(b, (int)sh + 0x2C);
            long strSh = shoff + (long)link * shentsize;
            long strOff = BitConverter.ToInt64(b, (int)strSh + 0x18);
            long vn = off;
            for (uint i = 0; i < count && vn + 16 <= b.Length; i++)
            {
                int cnt = BitConverter.ToUInt16(b, (int)vn + 2);
                long aux = vn + BitConverter.ToUInt32(b, (int)vn + 8);
                for (int a = 0; a < cnt && aux + 16 <= b.Length; a++)
                {
                    long nameOff = strOff + BitConverter.ToUInt32(b, (int)aux + 8);
                    int end = (int)nameOff;
                    while (end < b.Length && b[end] != 0) end++;
                    var auxName = Encoding.ASCII.GetString(b, (int)nameOff, end - (int)nameOff);
                    if (auxName == name)
                    {
                        ushort flags = BitConverter.ToUInt16(b, (int)aux + 4);
                        if ((flags & 0x2) == 0)
                        {
                            flags |= 0x2; // VER_FLG_WEAK
                            b[aux + 4] = (byte)flags; b[aux + 5] = (byte)(flags >> 8);
                            changed++;
                        }
                    }
                    uint next = BitConverter.ToUInt32(b, (int)aux + 12);
                    if (next == 0) break;
                    aux += next;
                }
                uint vnNext = BitConverter.ToUInt32(b, (int)vn + 12);
                if (vnNext == 0) break;
                vn += vnNext;
            }
        }
        return found ? changed : -1;
    }
}
