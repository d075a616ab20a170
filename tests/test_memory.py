"""diffq.memory: float weights read through a checkpoint's memory map leave the resident set once quantized."""

import importlib
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

import diffq
from diffq import memory
from diffq.pipelines import load_time
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import tiny_sd_pipeline

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self")


def _mapped_resident_mib() -> float:
    """This process's resident pages of mapped files (regular and tmpfs), MiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return sum(int(fields[k].split()[0]) for k in ("RssFile", "RssShmem")) / 1024


def test_mapped_tensors_leave_the_resident_set_and_keep_their_values(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(8)}, path)  # 32 MiB of float32
    weights = load_file(path)  # memory-mapped, not copied
    sums = {k: float(v.sum()) for k, v in weights.items()}  # reads every page
    before = _mapped_resident_mib()
    released = memory.release_file_pages(weights.values())
    assert released >= 31 * 2**20
    assert before - _mapped_resident_mib() >= 24  # most of the 32 MiB, whatever else the process maps meanwhile
    assert {k: float(v.sum()) for k, v in weights.items()} == sums  # read again from the file


def test_tensors_in_anonymous_memory_are_left_alone():
    t = torch.randn(1024, 1024)
    copy = t.clone()
    assert memory.release_file_pages([t, t[:, :7], torch.empty(0)]) == 0
    assert torch.equal(t, copy)


def test_quantizing_while_loading_hands_back_each_layers_mapped_weights(tmp_path, monkeypatch):
    tiny_sd_pipeline().unet.save_pretrained(tmp_path)
    handed = []
    monkeypatch.setattr(load_time, "release_file_pages", lambda tensors: handed.append(list(tensors)))
    unet = UNet2DConditionModel.from_pretrained(tmp_path, quantization_config=diffq.DiffQConfig("w4a16-rtn"))
    plan = plan_of(unet)
    assert len(handed) == len(plan.layers)
    weights = [t for tensors in handed for t in tensors if t.dim() > 1]
    assert len(weights) == len(plan.layers)
    mappings = memory._file_mappings()  # the tensors handed over keep their shard mapped
    assert all(any(lo <= w.data_ptr() and w.data_ptr() + w.nbytes <= hi for lo, hi in mappings) for w in weights)



def test_conversion_hands_back_each_float_layers_weights(monkeypatch):
    handed = []
    monkeypatch.setattr(importlib.import_module("diffq.convert"), "release_file_pages", lambda tensors: handed.append(list(tensors)))
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    expected = [[layer.weight.data_ptr(), layer.bias.data_ptr()] for layer in (model[0], model[2])]
    diffq.quantize(model, "w4a16-rtn", progress=False)
    assert [[t.data_ptr() for t in tensors] for tensors in handed] == expected
