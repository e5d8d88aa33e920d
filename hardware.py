"""What the machine can compute fast: the precision rule shared by training, HellaSwag and the benchmarks.

bf16 halves memory traffic and, on hardware with bf16 units, doubles matmul throughput. Where there are no
such units it is emulated: on an AVX2-only CPU a bf16 matmul runs ~20x slower than fp32 (measured here: a
2-layer, 64-wide model took 4.3 s per 512-token step in bf16, 0.19 s in fp32). So `auto` picks bf16 only where
the device has it natively, and fp16 never (it needs loss scaling, which this recipe does not do).
"""
from __future__ import annotations

import functools
import sys

import torch

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX (Sapphire Rapids and later, Zen 4 and
# later), and the Armv8.6 BF16 extension on aarch64.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=None)
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The native-bf16 flags this CPU reports (empty: none, or not Linux, where we cannot tell)."""
    if not sys.platform.startswith("linux"):
        return ()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags)
    except OSError:
        pass
    return ()


def auto_mixed_precision(device: torch.device) -> tuple[str, str]:
    """("bf16" or "no", why) for `device`: bf16 on CUDA GPUs and CPUs that have it natively, else fp32."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):  # the default also says yes to emulated bf16 (V100, T4)
            return "bf16", f"{torch.cuda.get_device_name(device)} supports bf16"
        return "no", f"{torch.cuda.get_device_name(device)} has no bf16 support (fp32 matmuls run as TF32 where possible)"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return "bf16", f"this CPU has native bf16 instructions ({', '.join(flags)})"
        return "no", (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 instructions "
                      f"(AVX512-BF16/AMX): bf16 would be emulated, ~20x slower than fp32")
    return "no", f"bf16 speed on {device.type} is not known here"


def resolve_mixed_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The precision to run ("bf16" or "no") for a requested "auto", "bf16" or "no", and one line saying why.

    An explicit "bf16" is honoured everywhere; where it would be emulated, the line is a warning."""
    if requested == "auto":
        chosen, why = auto_mixed_precision(device)
        return chosen, f"precision: {'bf16 autocast' if chosen == 'bf16' else 'fp32'} (auto: {why})"
    if requested == "bf16" and device.type == "cpu" and not cpu_bf16_flags():
        return "bf16", ("warning: bf16 as requested, but this CPU has no native bf16 instructions: it runs emulated, "
                        "~20x slower than fp32 ('auto' picks fp32 here)")
    return requested, f"precision: {'bf16 autocast' if requested == 'bf16' else 'fp32'} (as requested)"


def resolve_dtype(requested: str, device: torch.device) -> tuple[str, str]:
    """`resolve_mixed_precision` for flags that name a dtype: "auto", "float32" or "bfloat16" in, one of the latter two
    out (the weights' dtype), with the line that says why."""
    precision, line = resolve_mixed_precision({"float32": "no", "bfloat16": "bf16"}.get(requested, requested), device)
    return ("bfloat16" if precision == "bf16" else "float32"), line.replace("bf16 autocast", "bf16")


def accelerate_device(**process_group_kwargs) -> torch.device:
    """The device the Accelerator of this launch will use, known before it is built (its precision depends on it).

    Accelerate's process state, and with it the process group, is created here: `process_group_kwargs` (e.g.
    `timeout`) must be the ones the Accelerator gets, which can no longer change them. Like AcceleratorState (and
    unlike a bare PartialState) it honours ACCELERATE_USE_CPU, which `accelerate launch --cpu` and CPU DDP runs set."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **process_group_kwargs).device
