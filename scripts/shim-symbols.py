#!/usr/bin/env python3
"""Will TorchSharp's shim run against this libtorch? Lists the functions libLibTorchSharp.so needs that no libtorch
library here defines (nor the C/C++ runtime of this machine), without loading either: a missing one would stop qlora
at load time (LD_BIND_NOW=1) or kill it at its first call. Reads the ELF dynamic symbol tables directly (no binutils).

Usage: shim-symbols.py <libLibTorchSharp.so> <libtorch lib dir>
Prints one JSON line: {"shim": ..., "libtorch": ..., "needed": N, "missing": [...], "ok": bool}; exit 0 if ok, 1 if not.
"""
import ctypes
import json
import mmap
import os
import struct
import sys

# Needed by the shim's symbol table but used by no relocation: GCC 13's libstdc++ init marker (the GLIBCXX_3.4.32 the
# build weakens, build/LibTorchSharpGlibcxxFix.targets). Absent from GCC 12's libstdc++ and harmless there.
IGNORED = {"_ZSt21ios_base_library_initv"}

SHN_UNDEF = 0
STB_WEAK = 2


def dynamic_symbols(path):
    """(defined, undefined-strong) symbol name sets of an ELF64 little-endian shared library's .dynsym."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    defined, undefined = set(), set()
    for name, kind, flags, addr, offset, size, link, info, align, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link]
        str_off = strtab[4]
        for i in range(1, size // entsize):
            st_name, st_info, st_other, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", data, offset + i * entsize)
            end = data.find(b"\0", str_off + st_name)
            sym = data[str_off + st_name:end].decode("ascii", "replace")
            if not sym:
                continue
            if st_shndx == SHN_UNDEF:
                if st_info >> 4 != STB_WEAK:
                    undefined.add(sym)
            else:
                defined.add(sym)
    return defined, undefined


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    shim, libdir = sys.argv[1], sys.argv[2]
    _, needed = dynamic_symbols(shim)
    provided = set()
    libraries = sorted(f for f in os.listdir(libdir) if f.startswith(("libtorch", "libc10")) and ".so" in f)
    for lib in libraries:
        try:
            provided |= dynamic_symbols(os.path.join(libdir, lib))[0]
        except (ValueError, OSError):
            pass
    runtime = []
    for name in ("libstdc++.so.6", "libc.so.6", "libm.so.6", "libgcc_s.so.1"):
        try:
            runtime.append(ctypes.CDLL(name))
        except OSError:
            pass

    def in_runtime(sym):
        for handle in runtime:
            try:
                getattr(handle, sym)
                return True
            except AttributeError:
                pass
        return False

    missing = sorted(s for s in needed if s not in provided and s not in IGNORED and not in_runtime(s))
    print(json.dumps({"shim": shim, "libtorch": libdir, "libraries": libraries, "needed": len(needed),
                      "missing_count": len(missing), "missing": missing[:200], "ok": not missing}))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
