"""What this host's CPU is, as far as a model's arithmetic depends on it."""

from __future__ import annotations

import platform

_ARCHES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
#: /proc/cpuinfo flags naming int8 dot-product instructions (x86 VNNI, Arm SDOT/UDOT)
_DOT_PRODUCT_FLAGS = {"avx512_vnni", "avx_vnni", "asimddp"}


def host_arch() -> str:
    """This machine's architecture under the names device profiles use (``x86_64``, ``aarch64``)."""
    machine = platform.machine()
    return _ARCHES.get(machine.lower(), machine)


def host_int8_dot_product() -> bool:
    """Whether this host's CPU has int8 dot-product instructions (VNNI, SDOT/UDOT).

    They matter for correctness, not only speed: without VNNI, x86 int8 kernels sum uint8*int8 products
    in pairs that saturate in int16, so a graph with full 8-bit weights computes something else there."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return bool(_DOT_PRODUCT_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False
