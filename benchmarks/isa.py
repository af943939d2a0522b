"""Run a benchmark as a plain AVX2 host would: AVX-512, VNNI and AMX hidden from CPUID.

    python benchmarks/detector.py --isa avx2

ONNX Runtime picks its int8 and fp32 kernels from CPUID once, when it loads. ``benchmarks/cpuid_mask.c``
(preloaded, built here with gcc) makes CPUID fault through Linux's CPUID faulting and answers it with
those feature bits cleared, so a VNNI host times the kernels an AVX2-only device (x86-64's baseline)
runs. The cores stay the same, so it is an estimate of such a device, not one: caches, clocks and
the AVX2 units are this host's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "cpuid_mask.c"
#: set in the masked child, so a script re-runs itself under the mask only once
MARK = "EDGEPACK_ISA_MASKED"


def mask_library() -> Path:
    """Build the preloaded library (once per source version) and return its path."""
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("this kernel or CPU has no CPUID faulting (no cpuid_fault in /proc/cpuinfo): "
                         "--isa avx2 cannot hide AVX-512 here")
    built = Path(tempfile.gettempdir()) / f"edgepack-cpuid-mask-{int(SOURCE.stat().st_mtime)}.so"
    if not built.exists():
        partial = built.with_suffix(".partial")
        done = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"building {SOURCE.name} failed (install gcc): {done.stderr.strip()[:300]}")
        partial.replace(built)
    return built


def rerun_masked(isa: str | None) -> None:
    """With ``isa == "avx2"``, run this same command again with the mask preloaded and exit with its
    status; in that child (or with no ``isa``), return at once."""
    if not isa or os.environ.get(MARK):
        return
    if isa != "avx2":
        raise SystemExit(f"--isa {isa}: only avx2 can be emulated")
    env = {**os.environ, MARK: isa, "LD_PRELOAD": f"{mask_library()} {os.environ.get('LD_PRELOAD', '')}".strip()}
    raise SystemExit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)


def kernels() -> str:
    """What ONNX Runtime's kernel choice sees, for the benchmark's header (numpy reads CPUID the same way)."""
    from numpy._core._multiarray_umath import __cpu_features__ as features

    seen = [name for name in ("AVX2", "AVX512F", "AVX512VNNI", "AVX512_SPR") if features.get(name)]
    masked = f"; AVX-512/VNNI/AMX hidden from CPUID ({SOURCE.name})" if os.environ.get(MARK) else ""
    return f"kernels see {' '.join(seen) or 'no AVX2'}{masked}"
