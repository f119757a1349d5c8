"""The AddressSanitizer worker: a child process, started with libasan preloaded, that loads
sanitized emulator modules and runs their launches (see sanitizer.py for the parent side).

Run as a script (not imported from the package) so that it needs neither nanovllm's import
path nor NumPy: arguments arrive as bytes and are copied into malloc'ed buffers of exactly
their size, so ASan knows where every array ends. On the first bad access ASan prints its
report to our stderr (a file the parent reads) and ends the process.

Protocol on two pipes, pickled tuples:
  ("kernels", path)                                  -> ("ok", [(name, [desc])], static_smem)
  ("launch", path, kernel, dims, smem, schedule, seed, argbuf, buffers, slots)
                                      -> ("ok", rc, message, [bytes | None], static_smem)
where buffers is [(data, write_back)] and slots is [(arg slot, buffer index)].
"""

import ctypes
import os
import pickle
import struct
import subprocess
import sys

# libasan intercepts vfork/posix_spawn badly; should anything here start a process, fork it.
subprocess._USE_VFORK = False
subprocess._USE_POSIX_SPAWN = False

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import native  # noqa: E402

SLOT = 16


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)  # malloc here resolves to ASan's interceptor (preloaded first)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    return libc


def _module(modules, path):
    if path not in modules:
        modules[path] = native.NativeModule(path)
    return modules[path]


def _launch(modules, libc, args_map_path, msg):
    _, path, kernel, dims, smem, schedule, seed, argbuf, buffers, slots = msg
    module = _module(modules, path)
    pointers = []
    for data, _ in buffers:
        p = libc.malloc(len(data))
        if data:
            ctypes.memmove(p, data, len(data))
        pointers.append(p)
    packed = bytearray(argbuf)
    lines = [f"smem {module.dynamic_smem_address():#x} {smem}"]
    for slot, index in slots:
        struct.pack_into("<Q", packed, SLOT * slot, pointers[index])
        lines.append(f"{slot} {pointers[index]:#x} {len(buffers[index][0])}")
    # Where each argument lives, so the parent can name the argument in ASan's report.
    with open(args_map_path, "w") as f:
        f.write("\n".join(lines))
    rc, message, static_smem = module.launch(kernel, dims, smem, schedule, seed, bytes(packed))
    results = [
        ctypes.string_at(p, len(data)) if (write_back and rc == 0 and data) else None
        for p, (data, write_back) in zip(pointers, buffers, strict=True)
    ]
    for p in pointers:
        libc.free(p)
    return ("ok", rc, message, results, static_smem)


def main() -> None:
    rfd, wfd, args_map_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    inp, out = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb")
    libc = _libc()
    modules: dict[str, native.NativeModule] = {}
    while True:
        try:
            msg = pickle.load(inp)
        except EOFError:
            return
        try:
            if msg[0] == "kernels":
                module = _module(modules, msg[1])
                reply = ("ok", module.kernels(), module.static_smem_bytes())
            else:
                reply = _launch(modules, libc, args_map_path, msg)
        except Exception as exc:  # reported to the parent, which raises it
            reply = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__":
    main()
