"""benchmarks/gpu_check.py: its CPU-runnable parts (the GPU run itself needs a CUDA machine)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parent.parent / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
CPU = torch.device("cpu")


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run its checks")
def test_without_cuda_it_says_so_and_fails(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["gpu_check.py"])
    assert gpu_check.main() == 1
    assert "CUDA is not available" in capsys.readouterr().out


def test_sync_free_steps_run_on_the_cpu():
    row = gpu_check.check_sync_free_step(CPU, tiny_cnn, steps=3, batch=16)
    assert row["ok"] and "needs CUDA" in row["result"]


def test_epoch_ratio_and_data_on_device_rows():
    ratio = gpu_check.check_epoch_ratio(CPU, tiny_cnn, n=128, batch=32, epochs=1)
    assert "SGD" in ratio["result"] and "goal <= 1.4" in ratio["result"]
    kept = gpu_check.check_data_on_device(CPU, tiny_cnn, n=128, batch=32)
    assert "copied per batch" in kept["result"]


def test_resume_is_bitwise_on_the_cpu():
    row = gpu_check.check_resume(CPU, tiny_cnn, n=128, batch=32)
    assert row == dict(check="resume", ok=True, result="bitwise equal (weights, buffers, h)")


def test_resume_check_can_fail(monkeypatch):
    """A resume that loses the optimizer state (h back to its initial value) is caught."""
    original = torch.optim.Optimizer.load_state_dict
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", lambda self, state: None)
    row = gpu_check.check_resume(CPU, tiny_cnn, n=128, batch=32)
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", original)
    assert not row["ok"] and "max |diff|" in row["result"]


def test_table_has_a_row_per_check():
    text = gpu_check.table([dict(check="a", ok=True, result="x"), dict(check="bb", ok=False, result="y")])
    assert text.splitlines() == ["check  ok    result", "a      yes   x", "bb     NO    y"]
