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
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "cpuid_mask.c"
#: set in the masked child, so a script re-runs itself under the mask only once
MARK = "EDGEPACK_ISA_MASKED"


def mask_library() -> Path:
    """Build the preloaded library into a fresh private folder (gcc takes well under a second; nothing
    shared in /tmp is ever preloaded) and return its path."""
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform != "linux" or platform.machine() != "x86_64" or "cpuid_fault" not in cpuinfo.read_text():
        raise SystemExit("--isa avx2 needs Linux on x86-64 with CPUID faulting (cpuid_fault in /proc/cpuinfo); "
                         "run it on such a host")
    if not shutil.which("gcc"):
        raise SystemExit("--isa avx2 builds benchmarks/cpuid_mask.c with gcc: install gcc (apt-get install -y gcc)")
    built = Path(tempfile.mkdtemp(prefix="edgepack-cpuid-mask-")) / "cpuid_mask.so"
    done = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-ldl"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        raise SystemExit(f"building {SOURCE.name} with gcc failed: {first}")
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


def cpu_features() -> dict:
    """numpy's view of CPUID (read the way ONNX Runtime reads it, at load)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return features


def kernels() -> str:
    """What ONNX Runtime's kernel choice sees, for the benchmark's header. In a masked run, a mask that
    did not take (the library not preloaded, no CPUID faulting) stops the benchmark rather than print
    this host's figures as an AVX2 device's."""
    features = cpu_features()
    seen = [name for name in ("AVX2", "AVX512F", "AVX512VNNI", "AVX512_SPR") if features.get(name)]
    masked = ""
    if os.environ.get(MARK):
        if features.get("AVX512F") or features.get("AVX512VNNI"):
            raise SystemExit(f"the CPUID mask did not take (ONNX Runtime would see {' '.join(seen)}); "
                             "check that LD_PRELOAD loads it and that the kernel allows CPUID faulting")
        masked = f"; AVX-512/VNNI/AMX hidden from CPUID ({SOURCE.name})"
    return f"kernels see {' '.join(seen) or 'no AVX2'}{masked}"
