"""The device facts: bf16 only where the device computes it natively; the peak FLOP/s that MFU divides by."""
import pytest
import torch

from gpt2repro import launch


@pytest.mark.parametrize("flags_line, expected", [
    ("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw", ()),  # AVX-512 without its bf16 extension
    ("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", ("avx512_bf16", "amx_bf16")),
    ("Features\t: fp asimd sve bf16 i8mm", ("bf16",)),  # aarch64, Armv8.6 BF16
])
def test_cpu_bf16_flags_from_cpuinfo(tmp_path, flags_line, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{flags_line}\n\nprocessor\t: 1\n{flags_line}\n")
    assert launch.cpu_bf16_flags(str(cpuinfo)) == expected


def test_auto_on_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(launch, "cpu_bf16_flags", lambda: ())
    precision, line = launch.resolve_mixed_precision("auto", cpu)
    assert precision == "no" and line.startswith("precision: fp32 (auto: ") and "emulated" in line
    assert launch.resolve_dtype("auto", cpu)[0] == "float32"
    precision, line = launch.resolve_mixed_precision("bf16", cpu)  # honoured, with a warning
    assert precision == "bf16" and line.startswith("warning: ")
    assert launch.resolve_dtype("bfloat16", cpu)[0] == "bfloat16"
    assert launch.resolve_mixed_precision("no", cpu) == ("no", "precision: fp32 (as requested)")
    monkeypatch.setattr(launch, "cpu_bf16_flags", lambda: ("amx_bf16",))
    precision, line = launch.resolve_mixed_precision("auto", cpu)
    assert precision == "bf16" and "amx_bf16" in line
    assert launch.resolve_dtype("auto", cpu) == ("bfloat16", line.replace("bf16 autocast", "bf16"))
    assert launch.resolve_mixed_precision("bf16", cpu)[1] == "precision: bf16 autocast (as requested)"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "no")])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, supported, expected):
    # like torch's: by default it also says yes where bf16 is only emulated (V100, T4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H100 80GB HBM3")
    precision, line = launch.resolve_mixed_precision("auto", torch.device("cuda", 0))
    assert precision == expected and "NVIDIA H100 80GB HBM3" in line
    assert launch.resolve_mixed_precision("auto", torch.device("mps"))[0] == "no"  # unknown: the safe choice


@pytest.mark.parametrize("device_name, bf16_peak, tf32_peak", [  # NVIDIA datasheets, dense TFLOP/s
    ("NVIDIA A100-SXM4-80GB", 312, 156),
    ("NVIDIA A100-PCIE-40GB", 312, 156),
    ("NVIDIA H100 80GB HBM3", 989, 495),  # SXM: 989.4 / 494.7
    ("NVIDIA H100 PCIe", 756, 378),
    ("NVIDIA H100 NVL", 835, 418),  # 835.5 / 417.5 (the datasheet's 1671 / 835 are with sparsity)
    ("NVIDIA H200", 989, 495),  # SXM: 989.5 / 494.5 (1979 / 989 with sparsity)
    ("NVIDIA H200 NVL", 835, 418),  # 835.5 / 417.5
    ("NVIDIA GH200 480GB", 989, 495),  # the superchip's GPU: H100/H200 SXM peaks
    ("NVIDIA GeForce RTX 4090", None, None),  # unknown: no MFU rather than a wrong one
])
def test_gpu_peak_flops_follow_the_name_and_precision(device_name, bf16_peak, tf32_peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    cuda = torch.device("cuda", 0)
    for precision, tflops in (("bf16", bf16_peak), ("no", tf32_peak)):
        peak = launch.peak_flops_per_device(cuda, precision)
        assert peak == (None if tflops is None else pytest.approx(tflops * 1e12, rel=2e-3)), precision


def test_fsdp_plugin_is_the_recipes_policy_for_fsdp2_only(monkeypatch):
    """FSDP2 launches get fp32 gradient reduction (weights fp32 under autocast); an FSDP1 config gets no plugin of
    ours, so that check_fsdp_launch refuses it in one line rather than Accelerate's plugin with a traceback."""
    if launch.Version(launch.accelerate.__version__) < launch.FSDP_ACCELERATE:
        assert launch.fsdp_plugin() is None
        return
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert launch.fsdp_plugin() is None
    monkeypatch.setenv("FSDP_VERSION", "2")
    policy = launch.fsdp_plugin().mixed_precision_policy
    assert policy.param_dtype is None and policy.reduce_dtype == torch.float32
