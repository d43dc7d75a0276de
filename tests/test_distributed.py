"""`sepconv train` under torchrun: 2 CPU processes (gloo, DistributedDataParallel) end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from sepconv.io import load_state_dict
from sepconv.nets import small_vgg

# Each rank runs the CLI's training and then dumps the weights it ended with.
WORKER = """
import os, sys
from sepconv.cli import build_parser
from sepconv.commands import train
from sepconv.io import save_state_dict

model = train.execute(build_parser().parse_args(sys.argv[2:]))
save_state_dict(model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.safetensors"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_end_with_identical_weights(tmp_path: Path) -> None:
    worker, out = tmp_path / "worker.py", tmp_path / "run"
    worker.write_text(WORKER)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    args = ["train", "--arch", "small_vgg", "--conv", "separable", "--width", "8", "--epochs", "2"]
    args += ["--limit-train", "256", "--limit-test", "100", "--batch-size", "32", "--device", "cpu", "--out", str(out)]
    command = [*launcher, f"--master_port={free_port()}", str(worker), str(tmp_path), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    ranks = [load_state_dict(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:  # parameters and BatchNorm statistics alike
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    written = load_state_dict(out / "model.safetensors")
    assert all(torch.equal(written[k], ranks[0][k]) for k in written)
    torch.manual_seed(0)  # the CLI's --seed 0 initialisation
    initial = small_vgg("separable", width=8).state_dict()
    assert not torch.equal(written["1.0.depthwise.weight"], initial["1.0.depthwise.weight"])  # it trained

    # only rank 0 wrote, and the two processes shared the data: 128 training images each per epoch
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["world_size"] == 2 and metrics["complete"]
    assert [e["train_samples"] for e in metrics["epochs"]] == [256, 256]
    assert result.stdout.count("epoch 2/2: train loss") == 1  # rank 0 alone prints
