"""glibc's ``malloc_trim``, looked up once for the processes that hand freed memory back to the OS.

Freed memory often stays with malloc (fragmented, or in arenas no thread uses now) and counts as
the process's RSS; ``malloc_trim(0)`` returns what it can. Two callers: the store after a
compaction (:mod:`store.chroma`) and ``synth-agent serve``'s periodic trimmer
(:class:`synth_agent.serving.MallocTrimmer`). Here, in ``store``, because ``store`` must not
import ``synth_agent``.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def malloc_trim_function() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim(pad)``, or None where there is none (musl, macOS, Windows).

    ctypes releases the GIL while it runs.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no libc.so.6 (musl), or a libc without malloc_trim
        return None
    return trim


__all__ = ["malloc_trim_function"]
