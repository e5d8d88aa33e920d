"""What the machine can compute fast: the precision rule shared by training, HellaSwag and the benchmarks, the peak
FLOP/s that MFU is measured against, and the CPU allocator setting that keeps steps from page-faulting.

bf16 halves memory traffic and, on hardware with bf16 units, doubles matmul throughput. Where there are no
such units it is emulated: on an AVX2-only CPU a bf16 matmul runs ~20x slower than fp32 (measured here: a
2-layer, 64-wide model took 4.3 s per 512-token step in bf16, 0.19 s in fp32). So `auto` picks bf16 only where
the device has it natively, and fp16 never (it needs loss scaling, which this recipe does not do).
"""
from __future__ import annotations

import ctypes
import datetime
import functools
import os
import sys
from typing import TYPE_CHECKING

import accelerate
import torch
from accelerate.utils import DistributedType
from packaging.version import Version

from gpt2repro.run_control import TrainingError
from gpt2repro.settings import OptimizerSettings

if TYPE_CHECKING:
    from accelerate import Accelerator

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX (Sapphire Rapids and later, Zen 4 and
# later), and the Armv8.6 BF16 extension on aarch64.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# Dense (no sparsity) peak FLOP/s of one GPU from NVIDIA's datasheets, for MFU, by --mixed_precision: "no" runs
# fp32 matmuls as TF32 (half the bf16 rate). Matched in order as a substring of torch's device name, so the
# PCIe and NVL cards come before "H100" (the SXM part, e.g. "NVIDIA H100 80GB HBM3"). "H200" also matches the
# GH200 superchip ("NVIDIA GH200 480GB"), whose GPU has the H100/H200 SXM peaks.
GPU_PEAK_FLOPS = {
    "H200 NVL": {"bf16": 835e12, "no": 418e12},  # the datasheet's 1,671 / 835 TFLOPS are with sparsity
    "H200": {"bf16": 989e12, "no": 495e12},  # SXM: 1,979 / 989 with sparsity
    "H100 PCIe": {"bf16": 756e12, "no": 378e12},
    "H100 NVL": {"bf16": 835e12, "no": 418e12},
    "H100": {"bf16": 989e12, "no": 495e12},
    "A100": {"bf16": 312e12, "no": 156e12},  # SXM and PCIe have the same peaks
}


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
        # the default also says yes to emulated bf16 (V100, T4)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{torch.cuda.get_device_name(device)} supports bf16"
        return "no", (f"{torch.cuda.get_device_name(device)} has no bf16 support "
                      f"(fp32 matmuls run as TF32 where possible)")
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


def pin_cpu_allocator() -> None:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS on every step.

    glibc serves blocks over 32 MB with mmap and unmaps them on free, so each training step page-faults its
    activations back in (measured here: 0.5-1.7 s of a 2-3 s GPT-2 step). This is what MALLOC_MMAP_MAX_=0 and
    a huge MALLOC_TRIM_THRESHOLD_ do, set at run time through mallopt(3).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (e.g. musl)
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # an int: the largest threshold mallopt accepts


def cpu_peak_flops() -> float | None:
    """Theoretical fp32 peak of the cores this process computes on: threads x clock x FLOPs per cycle of the
    vector FMA units torch uses (2 FMA units x 8 fp32 lanes x 2 FLOPs = 32 on AVX2, 16 lanes: 64 on AVX-512).
    CPUs without AVX512-BF16/AMX run bf16 no faster than this."""
    flops_per_cycle = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability(), 16)
    try:
        with open("/proc/cpuinfo") as f:
            mhz = max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    except (OSError, ValueError):  # not Linux, or no clock listed
        return None
    return torch.get_num_threads() * mhz * 1e6 * flops_per_cycle


def peak_flops_per_device(device: torch.device, mixed_precision: str) -> float | None:
    """A device's peak FLOP/s for MFU: the datasheet figure of known GPUs at `mixed_precision` ("no" or "bf16"),
    the FMA peak on CPU, else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peaks[mixed_precision] for key, peaks in GPU_PEAK_FLOPS.items() if key in name), None)
    if device.type == "cpu":
        return cpu_peak_flops()
    return None


def fsdp_launch() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it sets ACCELERATE_USE_FSDP for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def compile_backend() -> str:
    """torch.compile's backend for training: the one `accelerate launch --dynamo_backend` named, else inductor."""
    launch_backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    return "inductor" if launch_backend == "no" else launch_backend


def resolve_compile(compile: str, cuda: bool) -> str:
    """--compile with `auto` resolved: on CUDA, where compiling pays, or when `accelerate launch --dynamo_backend`
    named a backend; but not under FSDP, whose compiled blocks no GPU has measured yet; else off."""
    if compile != "auto":
        return compile
    launch_asked = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() != "no"
    return "on" if (cuda or launch_asked) and not fsdp_launch() else "off"


def compile_kwargs() -> dict:
    """torch.compile's arguments for training as `accelerate launch` gives them (--dynamo_backend, else inductor;
    --dynamo_mode; --dynamo_use_dynamic), with fullgraph: a graph break in our model is an error, not a silent loss of
    compile's speed."""
    from accelerate.utils import TorchDynamoPlugin

    launch = TorchDynamoPlugin()  # reads the ACCELERATE_DYNAMO_* environment
    return {"backend": compile_backend(), "mode": launch.mode, "dynamic": launch.dynamic, "fullgraph": True}


def build_accelerator(mixed_precision: str, compile: str, report_to: str, ddp_timeout_s: int,
                      project_dir: str) -> tuple[Accelerator, str, str, str]:
    """The Accelerator of a training launch on this machine; returns it with the mixed precision and compile setting
    chosen for its device (`auto` resolved: bf16 where native; compile on CUDA, where it pays, or when `accelerate
    launch --dynamo_backend` named a backend) and the line that says why that precision. Also sets TF32 matmuls on
    CUDA and the CPU allocator's pinning. A tracker whose package is missing is a CommandError."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin, is_tensorboard_available, is_wandb_available

    from gpt2repro.cli import CommandError

    if report_to in ("tensorboard", "all") and not is_tensorboard_available():
        raise CommandError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    if report_to == "wandb" and not is_wandb_available():
        raise CommandError("--report_to wandb needs the wandb package: pip install wandb")
    process_group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=ddp_timeout_s))
    device = accelerate_device(timeout=process_group.timeout)  # to_kwargs() would drop a timeout equal to its default
    mixed_precision, precision_line = resolve_mixed_precision(mixed_precision, device)
    compile = resolve_compile(compile, cuda=device.type == "cuda")
    # Accelerate compiles nothing: it would compile around its DDP or FSDP wrapper. Dynamo cannot trace DDP's forward
    # whole (a logger call breaks it: an error under fullgraph, which crashed every multi-GPU launch at step 0), and
    # FSDP's plain module, which evaluation runs, would lose its FSDP root. The training script compiles the model's
    # (under FSDP each Block's) forward inside the wrapper instead (gpt2repro.training.compile_for_training).
    dynamo = TorchDynamoPlugin(backend="no")
    accelerator = Accelerator(mixed_precision=mixed_precision, project_dir=project_dir,
                              log_with=None if report_to == "none" else report_to, dynamo_plugin=dynamo,
                              fsdp_plugin=fsdp_plugin() if fsdp_launch() else None, kwargs_handlers=[process_group])
    if accelerator.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls outside autocast run as TF32 (~3x on A100)
    elif accelerator.device.type == "cpu":
        pin_cpu_allocator()
    return accelerator, mixed_precision, compile, precision_line


def fsdp_plugin():
    """The FSDP launch's plugin (the rest from its config, through the FSDP_* environment) with the recipe's
    numerics, which Accelerate's own for bf16 (bf16 weights and bf16 gradient reduction) are not: weights kept and
    gathered in fp32 and cast by autocast for the matmuls as under DDP, the residual stream fp32, gradients
    reduce-scattered and accumulated over micro-steps in fp32 (benchmarks/bench_fsdp_precision.py measures the
    choice). None where the launch is not FSDP2 or accelerate is too old for it: check_fsdp_launch refuses those in
    one line (FSDP1's plugin would reject the FSDP2 policy with a traceback first)."""
    if Version(accelerate.__version__) < FSDP_ACCELERATE or os.environ.get("FSDP_VERSION", "1") != "2":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(mixed_precision_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))


FSDP_ACCELERATE = Version("1.16")  # its FSDP2 path is what tests/test_train_cluster.py runs


def check_fsdp_launch(accelerator: Accelerator, optim: OptimizerSettings) -> None:
    """Under an FSDP launch (accelerate_configs/fsdp2_8gpu.yaml), what cannot work with it, refused before any work."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if Version(accelerate.__version__) < FSDP_ACCELERATE:
        raise TrainingError(f"FSDP needs accelerate >= {FSDP_ACCELERATE} (the release its FSDP2 path is tested with "
                            f"here); this is {accelerate.__version__}: pip install -U accelerate")
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise TrainingError("this script trains with FSDP2: set fsdp_version: 2 in the Accelerate config (as "
                            "accelerate_configs/fsdp2_8gpu.yaml does)")
    if optim.optimizer == "muon":
        raise TrainingError("Muon orthogonalises whole matrices and FSDP splits each one among the processes: train "
                            "with Muon under DDP (accelerate_configs/8gpu_ddp_bf16.yaml), with --shard_optimizer to "
                            "split its state")
    if optim.shard_optimizer:
        raise TrainingError("FSDP already splits the optimiser state with the parameters: drop --shard_optimizer")
