"""Process-wide settings the server needs before it starts threads: malloc arenas, open files.

- glibc gives each thread that allocates its own malloc arena, up to 8 per core, and keeps
  what a freed arena held. With a thousand request threads, each large request (tokenizing a
  4 MB prompt takes ~330 MB at its peak) left its memory in another arena: RSS climbed to
  5.8 GB after 34 /tokenize calls. Two arenas, set with mallopt(M_ARENA_MAX) as
  MALLOC_ARENA_MAX=2 would, keep RSS flat (measured in docs/architecture.md).
- Every connection holds a file descriptor, and waitress may add two temporary files per
  connection (a request body over 512 KB, a response over 1 MB), so the soft limit on open
  files is raised to the hard limit (at most 65536, as vLLM does) and the connection limit
  derived from it: beyond it waitress stops accepting instead of failing accept() in a loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

logger = logging.getLogger("nanovllm.server")

MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h
MAX_OPEN_FILES = 65536
RESERVED_FILES = 128  # the model's files, the listening socket, logs, pipes
FILES_PER_CONNECTION = 3  # the socket and, at worst, a temporary file each way


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """mallopt(M_ARENA_MAX, arenas) on glibc; False where there is no such call (musl, macOS).
    Arenas created before it stay; call it before starting threads."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return mallopt(_M_ARENA_MAX, arenas) == 1


def raise_open_files_limit(target: int = MAX_OPEN_FILES) -> int:
    """Raise the soft limit on open files towards `target` (never above the hard limit);
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as e:
            logger.warning("could not raise the open-files limit from %d: %s", soft, e)
    return soft


def connection_limit(open_files: int) -> int:
    """Connections the server may hold without running out of file descriptors."""
    return max(16, (open_files - RESERVED_FILES) // FILES_PER_CONNECTION)
