"""Peak resident memory of the stage-6 write and merge path: flat, not one more model.

At MedGemma-4B shape stage 6 used to hold its 6.4 GB of dequantised weights in a dict before
writing them, and the merge-gap check loaded stage 5 as a second 10 GB model on the CPU just to read
the originals of the 4-bit layers (3.06 peaked at 35.4 GB resident). Both now go one tensor at a
time. Each test measures the project's code and the old way side by side, in fresh subprocesses, on
a model large enough (254 MB) that one more copy cannot hide in the interpreter's own memory.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kormedgemma.core.io import stream_safetensors

MB = 2**20

PEAK = """
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def reset_peak():  # VmHWM starts again from the current RSS (Linux: clear_refs 5)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
"""

SWAP = PEAK + """
import json, sys, torch
from transformers import AutoModelForCausalLM
from kormedgemma.training.stage import _swap_base
folder, dequantised, way = sys.argv[1:4]
merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
for parameter in merged.parameters():  # resident, as on the GPU: not pages of the file it was read from
    parameter.data = parameter.data.clone()
reset_peak()
loaded = rss("VmRSS:")
with torch.no_grad():
    if way == "project":
        _swap_base(merged, dequantised, folder)
    else:  # the old way: the originals as a second model in RAM
        from safetensors.torch import load_file
        originals = dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).named_parameters())
        targets = dict(merged.named_parameters())
        for key, tensor in load_file(dequantised).items():
            targets[key].add_(originals[key] - tensor)
print(json.dumps({"loaded": loaded, "peak": rss("VmHWM:"), "sum": float(sum(p.detach().double().sum() for p in merged.parameters()))}))
"""

WRITE = PEAK + """
import json, sys, torch
from kormedgemma.core.io import stream_safetensors
path, way, count, numel = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def make(name):  # a layer dequantised on demand
    return torch.full((numel,), float(name.split(".")[1]), dtype=torch.bfloat16)
names = [f"layer.{i}.weight" for i in range(count)]
reset_peak()
before = rss("VmRSS:")
if way == "project":
    stream_safetensors(path, [(n, (numel,), torch.bfloat16) for n in names], make)
else:  # the old way: every dequantised layer in a dict, then save_file
    from safetensors.torch import save_file
    save_file({n: make(n) for n in names}, path)
print(json.dumps({"before": before, "peak": rss("VmHWM:")}))
"""


def _run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                            "PYTHONPATH": ":".join(sys.path),
                                            # a fixed mmap threshold: glibc raises its own after the first
                                            # large free, and then freed tensors linger in its arenas or
                                            # not by which thread freed them (48 to 128 MB in one run in
                                            # three); fixed, a freed tensor leaves RSS at once and the
                                            # figure is what the code holds
                                            "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A Gemma 3 text model of 254 MB (fp32) saved as a folder, and a 'dequantised' file of its
    linear layers: each weight plus 0.01, as NF4 rounding would have moved it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("gemma3_text")
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(folder)
    linear = {name: p.detach() for name, p in model.named_parameters() if name.endswith("proj.weight")}
    stream_safetensors(folder / "dequantised.safetensors", [(k, tuple(v.shape), v.dtype) for k, v in linear.items()],
                       lambda key: linear[key] + 0.01)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    linear_bytes = sum(v.numel() * v.element_size() for v in linear.values())
    expected = float(sum(p.detach().double().sum() for p in model.parameters())) - 0.01 * sum(v.numel() for v in linear.values())
    return folder, total, linear_bytes, expected


def test_merge_gap_reads_the_originals_without_a_second_model_in_ram(text_model):
    folder, total, linear_bytes, expected = text_model
    assert total > 240 * MB and linear_bytes > 0.9 * total
    project = _run(SWAP, folder, folder / "dequantised.safetensors", "project")
    old = _run(SWAP, folder, folder / "dequantised.safetensors", "old")
    # both put W - W_deq under each weight: every linear weight moved by exactly -0.01
    assert project["sum"] == pytest.approx(expected, rel=1e-5) and old["sum"] == pytest.approx(project["sum"], rel=1e-6)
    bound = 0.35 * total  # a few layers in flight, never the model again
    assert project["peak"] - project["loaded"] < bound, (project, total)
    assert old["peak"] - old["loaded"] > bound, (old, total)  # the bound is one the old way breaks


def test_dequantised_weights_are_written_one_layer_at_a_time(tmp_path):
    count, numel = 8, 32 * MB  # eight 64 MB bf16 layers: 512 MB in all
    project = _run(WRITE, tmp_path / "project.safetensors", "project", count, numel)
    old = _run(WRITE, tmp_path / "old.safetensors", "old", count, numel)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "project.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == [f"layer.{i}.weight" for i in range(count)]
        assert all(float(handle.get_tensor(f"layer.{i}.weight")[-1]) == i for i in range(count))
    layer, everything = 2 * numel, 2 * numel * count
    assert project["peak"] - project["before"] < 3 * layer, project
    assert old["peak"] - old["before"] > 0.9 * everything, old
