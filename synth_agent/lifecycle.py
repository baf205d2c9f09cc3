"""Process hygiene: every process a command starts ends with it, however the command ends.

Three cases, three mechanisms:

* **SIGTERM / Ctrl-C** to a command: :func:`exit_on_sigterm` turns SIGTERM into
  ``SystemExit(143)`` (Python already turns SIGINT into ``KeyboardInterrupt``), so
  ``with SimProcess(...)`` blocks unwind and stop their children politely. (uvicorn
  re-raises the signal it caught once it has shut down; without a handler the
  process would die right there and orphan its children — the bug this fixes.)
* **The parent is killed outright** (SIGKILL, OOM killer): a child started with
  :func:`child_env` calls :func:`watch_parent_from_env` first thing. On Linux it asks
  the kernel for a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``) and, on
  every platform, a daemon thread polls ``getppid()``; either way the child shuts
  down gracefully when its parent is gone.
* **Foreign programs** (vLLM, SGLang) cannot run our watcher:
  :func:`parent_death_preexec` sets the parent-death signal between ``fork`` and ``exec``.

The kernel sends the parent-death signal when the *thread* that forked the child
ends, so it is only requested when the child was started from the main thread;
the ``getppid()`` watcher covers the rest.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType

__all__ = [
    "PARENT_ENV",
    "child_env",
    "exit_on_sigterm",
    "parent_death_preexec",
    "set_parent_death_signal",
    "watch_parent_from_env",
]

PARENT_ENV = "SYNTH_AGENT_PARENT"
"""``<pid>:<main|thread>`` of the process (and kind of thread) that started this one."""

_PR_SET_PDEATHSIG = 1


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread, so cleanup code runs."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent (thread) dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def parent_death_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that sets the parent-death signal, or None.

    None when it would not be safe or useful: off Linux, or outside the main thread (the
    signal would fire when that thread ends, not when the process does).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only makes the call
    prctl = libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that should end with this process (see :func:`watch_parent_from_env`)."""
    out = dict(os.environ if env is None else env)
    kind = "main" if threading.current_thread() is threading.main_thread() else "thread"
    out[PARENT_ENV] = f"{os.getpid()}:{kind}"
    return out


def watch_parent_from_env(*, interval: float = 0.5, on_orphaned: Callable[[], None] | None = None) -> bool:
    """In a child started with :func:`child_env`: shut down (SIGTERM to self) once the parent is gone.

    Consumes the variable, so this process's own children are not confused by it. Returns
    True when a watch was set up.
    """
    raw = os.environ.pop(PARENT_ENV, "")
    pid_text, _, kind = raw.partition(":")
    if not pid_text.isdigit():
        return False
    parent = int(pid_text)
    stop = on_orphaned or (lambda: os.kill(os.getpid(), signal.SIGTERM))
    if kind == "main":
        set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before we got here
        stop()
        return True

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        stop()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return True
