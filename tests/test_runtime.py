"""select_runtime's decisions (device, precision, TF32, cuDNN, channels_last) and Runtime.place*.

No GPU exists on the machines these tests run on. Where a test needs "a GPU", it monkeypatches
``torch.cuda.is_available`` / ``is_bf16_supported`` / ``get_device_name``: that stands in for a
GPU for select_runtime's decisions only; nothing is ever run on CUDA here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tskd.engine.runtime import Runtime, select_runtime
from tskd.errors import ParamsError
from tskd.spec.config import TrainCfg


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """select_runtime sets process-wide torch flags: put them back for the tests that follow."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads())
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32, threads) = saved
    torch.set_num_threads(threads)


def fake_gpu(monkeypatch, *, bf16: bool) -> None:
    """Stands in for a CUDA GPU (with or without native bf16), which cannot exist here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU (sm_75)")


def no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_runs_fp32_even_when_bf16_is_asked(monkeypatch, device):
    no_gpu(monkeypatch)
    rt = select_runtime(TrainCfg(device=device, precision="bf16"))
    assert rt.device == torch.device("cpu")
    assert rt.precision == "fp32" and not rt.channels_last
    assert rt.autocast is contextlib.nullcontext
    with rt.autocast():  # and it really does nothing: a matmul stays fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_cpu_leaves_tf32_flags_alone(monkeypatch):
    no_gpu(monkeypatch)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    select_runtime(TrainCfg(device="cpu", deterministic=False))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_deterministic_pins_cudnn_on_cpu_as_on_cuda(monkeypatch):
    no_gpu(monkeypatch)
    torch.backends.cudnn.benchmark = True
    select_runtime(TrainCfg(device="cpu", deterministic=True))
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic


def test_cuda_asked_without_gpu_names_train_device(monkeypatch):
    no_gpu(monkeypatch)
    with pytest.raises(ParamsError, match=r"train\.device"):
        select_runtime(TrainCfg(device="cuda"))


def test_bf16_refused_on_a_gpu_without_it(monkeypatch):
    fake_gpu(monkeypatch, bf16=False)  # stands in for a pre-Ampere GPU
    with pytest.raises(ParamsError, match=r"train\.precision") as e:
        select_runtime(TrainCfg(device="cuda", precision="bf16"))
    assert "Stand-in GPU" in str(e.value) and "fp32" in str(e.value)


def test_bf16_refusal_asks_for_native_bf16_not_emulation(monkeypatch):
    """torch's default ``including_emulation=True`` would call a pre-Ampere GPU bf16-capable."""
    fake_gpu(monkeypatch, bf16=True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(ParamsError, match=r"train\.precision"):
        select_runtime(TrainCfg(device="auto", precision="bf16"))


def test_fp32_is_not_refused_on_a_gpu_without_bf16(monkeypatch):
    fake_gpu(monkeypatch, bf16=False)
    rt = select_runtime(TrainCfg(device="cuda", precision="fp32"))
    assert rt.device.type == "cuda" and rt.precision == "fp32" and rt.channels_last


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("tf32", [True, False])
def test_gpu_decisions(monkeypatch, deterministic, tf32):
    fake_gpu(monkeypatch, bf16=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    rt = select_runtime(TrainCfg(device="auto", precision="bf16", deterministic=deterministic, tf32=tf32))
    assert rt.device == torch.device("cuda") and rt.precision == "bf16" and rt.channels_last
    # TF32 stated explicitly (train.tf32), whatever it was before.
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32
    # Autotuning only when the run does not ask to be deterministic.
    assert torch.backends.cudnn.benchmark is (not deterministic)
    assert torch.backends.cudnn.deterministic is deterministic


def test_place_and_place_batch_are_plain_moves_on_cpu(monkeypatch):
    no_gpu(monkeypatch)
    rt = select_runtime(TrainCfg(device="cpu"))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    weight = net[0].weight
    assert rt.place(net) is net
    assert net[0].weight is weight and weight.is_contiguous()  # untouched: not re-laid out
    x = torch.randn(2, 3, 8, 8)
    assert rt.place_batch(x) is x  # .to() of a tensor already there returns it
    y = torch.arange(4)
    assert rt.place_batch(y) is y


def test_channels_last_path_on_cpu():
    """The layout code that select_runtime turns on for CUDA, exercised on CPU (same torch calls)."""
    rt = Runtime(torch.device("cpu"), contextlib.nullcontext, "fp32", channels_last=True)
    net = rt.place(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(6, 5)))
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last) and not net[0].weight.is_contiguous()
    assert net[1].weight.is_contiguous()  # 2-D weights keep their layout
    x = rt.place_batch(torch.randn(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    labels = rt.place_batch(torch.arange(2))
    assert labels.is_contiguous()
    torch.testing.assert_close(net[0](x), net[0](x.contiguous()))  # same numbers, other layout


def test_place_moves_a_distillers_hidden_teacher():
    from tskd.distill import DistillContext, build_distiller
    from tskd.models import create_model

    ctx = DistillContext(num_classes=10, image_size=(32, 32), epochs=4, num_train=8)
    d = build_distiller("kd", create_model("resnet8", 10), create_model("resnet8", 10), {}, ctx)
    rt = Runtime(torch.device("cpu"), contextlib.nullcontext, "fp32", channels_last=True)
    rt.place(d)
    conv = next(m for m in d.teacher.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
