"""One OpenBLAS thread for the calling thread, for the duration of a `with` block.

The fits run thousands of L-BFGS-B iterations on 5-vectors; scipy's L-BFGS-B calls BLAS for each one.
With OpenBLAS's default thread pool those tiny calls wait on worker threads, and on a busy 2-core
machine (or with one bootstrap process per core) a 20-start Chinchilla fit took 7.9 s instead of 0.5 s.
`openblas_set_num_threads_local` (OpenBLAS ≥ 0.3.27) changes only the calling thread and returns the
old value, so the setting is restored on exit and nothing else in the program is affected.
Where the library or the symbol is not found (macOS, MKL, older OpenBLAS) this does nothing.
threadpoolctl's `threadpool_limits(1)` would do the same job, were it a dependency.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys


@functools.cache
def _openblas_setters(loaded: tuple[str, ...]) -> tuple:
    """`openblas_set_num_threads_local` of each loaded OpenBLAS (numpy and scipy each ship their own)."""
    setters = []
    for path in loaded:
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local  # dlopen of a loaded library: same handle
        except (OSError, AttributeError):
            continue
        setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
        setters.append(setter)
    return tuple(setters)


def _loaded_openblas() -> tuple[str, ...]:
    if not sys.platform.startswith("linux"):
        return ()
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "openblas" in line and ".so" in line}
    return tuple(sorted(paths))


@contextlib.contextmanager
def one_blas_thread():
    setters = _openblas_setters(_loaded_openblas())
    previous = [setter(1) for setter in setters]
    try:
        yield
    finally:
        for setter, count in zip(setters, previous, strict=True):
            setter(count)
