"""Point the OpenBLAS inside faiss-cpu at the right kernels before FAISS loads it.

The OpenBLAS bundled with faiss-cpu (0.3.15) predates recent CPUs; on an AVX-512 CPU it does not
recognise it falls back to generic kernels and flat search runs several times slower (measured on
an Intel Sapphire Rapids machine: about 300 against 1,500 queries/s). OpenBLAS reads
OPENBLAS_CORETYPE once, when the library loads, so `configure` must run before `import faiss`;
`simsearch.index` calls it first thing. A value the user has set is always kept.

It also shortens how long idle OpenMP threads (FAISS's and torch's) spin before they sleep
(GOMP_SPINCOUNT, read when libgomp loads): simsearch runs numpy on Python threads between their
parallel regions, and threads spinning for the default 300,000 turns take the cores those need.
Measured on 2 cores: approximate search 40 against 37 ms per 1000 queries, one exact query over
200,000 vectors 29 against 19 ms.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

ENV = "OPENBLAS_CORETYPE"
# The instructions OpenBLAS's SkylakeX kernels use (its own runtime check asks for these).
SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"})
_CPUINFO = "/proc/cpuinfo"
SPIN_ENV = "GOMP_SPINCOUNT"
SPIN_COUNT = "10000"

_configured: str | None = None
_done = False


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def openblas_coretype(flags: Iterable[str], env: Mapping[str, str]) -> str | None:
    """The OPENBLAS_CORETYPE to set for these CPU flags, or None to leave OpenBLAS alone.

    None when the user chose a value (even an empty one) or the CPU lacks AVX-512; SkylakeX, the
    newest AVX-512 kernel set the bundled OpenBLAS has, when every instruction it needs is there.
    """
    if ENV in env:
        return None
    if SKYLAKEX_FLAGS <= frozenset(flags):
        return "SkylakeX"
    return None


def openmp_spin(env: Mapping[str, str]) -> str | None:
    """The GOMP_SPINCOUNT to set, or None where the user chose it or OpenMP's wait policy."""
    if SPIN_ENV in env or "OMP_WAIT_POLICY" in env:
        return None
    return SPIN_COUNT


def configure() -> str | None:
    """Set OPENBLAS_CORETYPE for this process if it helps, and GOMP_SPINCOUNT; returns the
    OPENBLAS_CORETYPE value set, if any.

    Idempotent; has no effect on libraries already loaded (numpy's OpenBLAS, usually, or torch
    when it was imported before simsearch).
    """
    global _configured, _done
    if _done:
        return _configured
    _done = True
    spin = openmp_spin(os.environ)
    if spin is not None:
        os.environ[SPIN_ENV] = spin
    value = openblas_coretype(cpu_flags(), os.environ)
    if value is not None:
        os.environ[ENV] = value
        _configured = value
        log.debug("set %s=%s for FAISS's OpenBLAS", ENV, value)
    return value


def describe(module: object | None = None) -> str:
    """One line naming the OpenBLAS FAISS loaded and its core type, for benchmarks and logs."""
    import ctypes
    import glob

    if module is None:
        import faiss as module
    base = os.path.dirname(os.path.dirname(getattr(module, "__file__", "") or ""))
    for path in sorted(glob.glob(os.path.join(base, "faiss_cpu.libs", "libopenblas*"))):
        try:
            lib = ctypes.CDLL(path)
            config = lib.openblas_get_config
            core = lib.openblas_get_corename
        except (OSError, AttributeError):
            continue
        config.restype = core.restype = ctypes.c_char_p
        name = f"{config().decode(errors='replace')}; core {core().decode(errors='replace')}"
        return f"{name}; {_settings()}"
    return f"no bundled OpenBLAS found; {_settings()}"


def _settings() -> str:
    return "; ".join(f"{key}={os.environ.get(key, '(unset)')}" for key in (ENV, SPIN_ENV))


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16 or AMX); without it bf16 is emulated."""
    import torch  # only callers about to use torch ask

    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, check, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # private torch helpers: absent or failing means "no"
            continue
    return False
