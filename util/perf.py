"""Process-level speed settings that need no change to the model code.

References: glibc mallopt(3) (M_MMAP_MAX, M_TRIM_THRESHOLD); measured in docs/BENCHMARKS.md.
"""
import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_kept = False


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step frees and reallocates the same large activation buffers every step (a ViT-Tiny MAE step at
    batch 64 has several of 38 MB, above malloc's mmap threshold). By default each is mmap'ed, unmapped when freed,
    and page-faulted in again next step: 60k-160k page faults and 0.15-0.3 s of system time per step on 2 cores.
    With mmap off and trimming off the buffers are reused: the process keeps its peak heap, which it needs again
    next step anyway. Same effect as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge> in the environment, but set
    from inside, so every recipe gets it. Idempotent; a no-op (returns False) where there is no glibc.
    """
    global _kept
    if _kept:
        return True
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        ok = False
    _kept = ok
    if not ok:
        log.debug('mallopt unavailable: CPU allocator left at its defaults')
    return ok
