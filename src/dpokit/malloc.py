"""Freed activations go back to the operating system during training (glibc on Linux).

glibc serves a large block from its heap once a block of that size has been freed (its mmap threshold rises to the
largest size freed), and the heap keeps what is freed there for reuse. A training step allocates and frees
gigabytes of activations of many sizes, so the heap fragments and peak RSS ratchets up past the live tensors:
one pair with a 2k-token prompt, three steps, peaked at 5.55 GB with glibc's defaults and 4.10 GB with a fixed
1 MiB threshold (AVX2 AMD EPYC, 2026-12-02, the same values bit for bit). With the threshold fixed, every block of
1 MiB or more is its own mapping, returned on free; its fresh pages then cost a page fault each, which transparent
huge pages (`glibc.malloc.hugetlb=1`: madvise) make rare — a 14 MB alloc + multiply measured 8.0 ms with the
defaults, 19.8 ms with the threshold alone, 9.8 ms with both.

glibc reads these tunables only when a process starts, so the `dpokit` commands that train re-execute themselves
once with GLIBC_TUNABLES extended (`reexec_tuned`), and the benchmark starts dpokit's workers with the same
environment (`tuned_env`). DPOKIT_MALLOC=system keeps the C library's defaults; a GLIBC_TUNABLES that already
sets `glibc.malloc.mmap_threshold` is left as the user set it. The Python API (`dpokit.train`) runs in the
caller's process and leaves its allocator alone.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576"
TRAINING_COMMANDS = frozenset({"train", "train-rm", "demo", "sweep", "cache-ref", "make-pairs"})


def applies(env: dict | None = None) -> bool:
    """Whether dpokit would set the tunables here: glibc on Linux, not opted out, not set by the user."""
    env = os.environ if env is None else env
    if env.get("DPOKIT_MALLOC", "tuned") == "system":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    return "glibc.malloc.mmap_threshold" not in env.get("GLIBC_TUNABLES", "")


def tuned_env(env: dict | None = None) -> dict:
    """A copy of `env` (default: this process's) with dpokit's tunables added where they apply."""
    env = dict(os.environ if env is None else env)
    if applies(env):
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), TUNABLES) if t)
    return env


def reexec_tuned(command: str) -> None:
    """Replace this process by `python -m dpokit <same arguments>` with the tunables set (same PID, so torchrun
    and signals are unaffected), for the commands that train; returns without doing anything otherwise."""
    if command not in TRAINING_COMMANDS or not applies():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "dpokit", *sys.argv[1:]], tuned_env())
