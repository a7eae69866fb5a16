"""Which CPU this is, and whether bf16 pays on it.

Learners' CPUs differ in the instructions their matrix products can use:

* **AVX2 only** (most laptops before ~2022, many cloud CPUs): no bf16 instructions. PyTorch
  still runs bf16, by converting to fp32 and back, at about *half* the fp32 speed.
* **AVX512-BF16** (AMD Zen 4/5, Intel Cooper Lake): a native bf16 dot product, about 2-3x
  the fp32 throughput in oneDNN's ``brg_matmul:avx512_core_bf16`` kernels.
* **AMX** (Intel Sapphire Rapids and newer): bf16 tile products, several times faster again.
* **Apple Silicon**: ARM NEON (BF16 from M2 on) on the CPU, and the MPS GPU.

PyTorch lets a process cap what its kernels use: ``ONEDNN_MAX_CPU_ISA`` for oneDNN (the bf16
products) and ``ATEN_CPU_CAPABILITY`` for ATen's vectorised element-wise kernels. The tests
use them to run the AMX-off and AVX2-only paths on one machine. ``torch``'s own check
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``) sees the AVX2 cap but *not* a cap at
``AVX512_CORE``: there it still answers True while oneDNN falls back to an emulated
``gemm:jit:bf16`` kernel no faster than fp32 (measured on this project's machine). So
:func:`cpu_supports_bf16` reads the caps itself.

``DPO_COURSE_CPU_BF16=0`` (or ``1``) overrides the answer: the documented way to force fp32
(or bf16) on any CPU.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

# oneDNN's ISA names in increasing order (its docs, "CPU dispatcher control"). Native bf16 dot
# products start at AVX512_CORE_BF16; AVX2_VNNI_2 only converts, it has no bf16 dot product.
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
               "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL", "DEFAULT")
FIRST_NATIVE_BF16 = ONEDNN_ISAS.index("AVX512_CORE_BF16")
# ATen capabilities below AVX512: element-wise bf16 kernels then convert to fp32 lane by lane
ATEN_WITHOUT_AVX512 = ("default", "avx2", "zvector", "vsx")
OVERRIDE_ENV = "DPO_COURSE_CPU_BF16"


def isa_cap(env=None) -> str | None:
    """The ``ONEDNN_MAX_CPU_ISA`` this process runs under, upper-cased, or None when uncapped."""
    env = os.environ if env is None else env
    value = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return value or None


def aten_cap(env=None) -> str | None:
    """The ``ATEN_CPU_CAPABILITY`` this process runs under, lower-cased, or None when uncapped."""
    env = os.environ if env is None else env
    return (env.get("ATEN_CPU_CAPABILITY") or "").strip().lower() or None


def cap_allows_native_bf16(env=None) -> bool:
    """False when an ISA cap (oneDNN's or ATen's) rules out native bf16 kernels."""
    env = os.environ if env is None else env
    cap = isa_cap(env)
    if cap is not None:
        if cap not in ONEDNN_ISAS:
            raise ValueError(f"ONEDNN_MAX_CPU_ISA={cap!r} is not one of oneDNN's ISA names {ONEDNN_ISAS}")
        if ONEDNN_ISAS.index(cap) < FIRST_NATIVE_BF16:
            return False
    return aten_cap(env) not in ATEN_WITHOUT_AVX512


def cpu_supports_bf16(env=None) -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX) within this process's ISA caps.

    Order: the ``DPO_COURSE_CPU_BF16`` override (``0``/``1``), then the caps
    (:func:`cap_allows_native_bf16`), then torch's hardware check. Where bf16 is only
    emulated it is slower than fp32, so the ``cpu`` preset trains in fp32 there.
    """
    env = os.environ if env is None else env
    forced = (env.get(OVERRIDE_ENV) or "").strip().lower()
    if forced:
        if forced not in ("0", "1", "true", "false"):
            raise ValueError(f"{OVERRIDE_ENV}={forced!r}: use 1 (bf16 autocast) or 0 (fp32)")
        return forced in ("1", "true")
    if not cap_allows_native_bf16(env):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@lru_cache(maxsize=None)
def _cpuinfo() -> str:
    """``/proc/cpuinfo`` (Linux), read once; empty elsewhere."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); empty elsewhere."""
    match = re.search(r"^flags\s*:\s*(.*)$", _cpuinfo(), re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def cpu_model() -> str:
    """A human-readable CPU name: ``model name`` on Linux, the brand string on a Mac."""
    match = re.search(r"^model name\s*:\s*(.*)$", _cpuinfo(), re.MULTILINE)
    if match:
        return match.group(1).strip()
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def hardware_isa() -> str:
    """The best bf16-relevant instruction set the hardware has: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2``,
    ``arm`` or ``other`` (caps not applied; see :func:`bf16_kernel` for what the products actually run)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "arm" if platform.machine().lower() in ("arm64", "aarch64") else "other"


@lru_cache(maxsize=None)
def bf16_kernel() -> str:
    """The oneDNN kernel a bf16 ``[64, 64] @ [64, 64]`` product runs under this process's caps, e.g.
    ``brg_matmul:avx512_core_amx``, ``gemm:jit:bf16`` (emulated), or ``aten-fallback`` when torch did not
    call oneDNN at all (no bf16 support seen: it converts to fp32 itself).

    Read from ``ONEDNN_VERBOSE`` in a child process (about two seconds, cached), which inherits this
    process's environment and so its caps.
    """
    code = ("import torch; a = torch.ones(64, 64, dtype=torch.bfloat16); torch.nn.functional.linear(a, a)")
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"primitive,exec,cpu,(?:matmul|inner_product),([^,]+),", proc.stdout)
    if match:
        return match.group(1)
    # torch sends bf16 products to oneDNN only where it sees bf16 support; elsewhere its own fp32-converting gemm
    return "aten-fallback" if proc.returncode == 0 else "unknown"


def cpu_path_key() -> list:
    """What decides which kernels (and so which roundings) a CPU run takes: part of cache keys for
    numbers computed in bf16, so a reference cached under AMX is never reused with AMX capped off."""
    return [cpu_model(), hardware_isa(), isa_cap(), aten_cap()]


def machine_info(kernel: bool = True) -> dict:
    """What a speed or timing figure needs beside it: CPU model, cores, ISA, caps, the bf16 kernel."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hardware_isa": hardware_isa(),
        "onednn_max_cpu_isa": isa_cap(),
        "aten_cpu_capability": aten_cap(),
        "bf16_native": cpu_supports_bf16(),
        "torch": torch.__version__,
    }
    if kernel:
        info["bf16_matmul_kernel"] = bf16_kernel()
    return info
