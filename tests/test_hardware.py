"""The precision rule: bf16 only where the device computes it natively."""
import pytest
import torch

import hardware


@pytest.mark.parametrize("flags_line, expected", [
    ("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw", ()),  # AVX-512 without its bf16 extension
    ("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", ("avx512_bf16", "amx_bf16")),
    ("Features\t: fp asimd sve bf16 i8mm", ("bf16",)),  # aarch64, Armv8.6 BF16
])
def test_cpu_bf16_flags_from_cpuinfo(tmp_path, flags_line, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{flags_line}\n\nprocessor\t: 1\n{flags_line}\n")
    assert hardware.cpu_bf16_flags(str(cpuinfo)) == expected


def test_auto_on_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ())
    precision, line = hardware.resolve_mixed_precision("auto", cpu)
    assert precision == "no" and line.startswith("precision: fp32 (auto: ") and "emulated" in line
    assert hardware.resolve_dtype("auto", cpu)[0] == "float32"
    precision, line = hardware.resolve_mixed_precision("bf16", cpu)  # honoured, with a warning
    assert precision == "bf16" and line.startswith("warning: ")
    assert hardware.resolve_dtype("bfloat16", cpu)[0] == "bfloat16"
    assert hardware.resolve_mixed_precision("no", cpu) == ("no", "precision: fp32 (as requested)")
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ("amx_bf16",))
    precision, line = hardware.resolve_mixed_precision("auto", cpu)
    assert precision == "bf16" and "amx_bf16" in line
    assert hardware.resolve_dtype("auto", cpu) == ("bfloat16", line.replace("bf16 autocast", "bf16"))
    assert hardware.resolve_mixed_precision("bf16", cpu)[1] == "precision: bf16 autocast (as requested)"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "no")])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, supported, expected):
    # like torch's: by default it also says yes where bf16 is only emulated (V100, T4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H100 80GB HBM3")
    precision, line = hardware.resolve_mixed_precision("auto", torch.device("cuda", 0))
    assert precision == expected and "NVIDIA H100 80GB HBM3" in line
    assert hardware.resolve_mixed_precision("auto", torch.device("mps"))[0] == "no"  # unknown: the safe choice
