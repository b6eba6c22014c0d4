"""Every Python code block of the README runs as written.

Blocks run in order in one namespace (a later block may use what an earlier one defined, as
a reader following the page would). What a block leaves to the reader (a dataset, a batch of
the right shape) is defined by the smallest prelude below, matched by a line of the block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

PRELUDES = {
    # the modules snippet feeds 8x8 one-channel images to the converted CNN
    "model[0].weight.grad_sample": (
        "x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))"
    ),
    # the DP-SGD snippets train on a small dataset of such images
    "pf.dp.make_private(": (
        "from torch.utils.data import TensorDataset\n"
        "dataset = TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,)))"
    ),
}

COMMON = "import torch, torch.nn.functional as F\nimport psgfunc as pf\n"

# the "Many processes" blocks are launched with torchrun; here they run as one process (world
# size 1 on the loopback interface), each block in a fresh process group
DIST_MARKER = "init_process_group"


def _single_process_group(monkeypatch) -> None:
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 3


def test_every_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a block writes lands in the repository
    namespace: dict = {"__name__": "readme"}
    exec(COMMON, namespace)
    import torch.distributed as dist

    try:
        for i, block in enumerate(python_blocks(README.read_text())):
            for marker, prelude in PRELUDES.items():
                if marker in block:
                    exec(prelude, namespace)
            if DIST_MARKER in block:
                _single_process_group(monkeypatch)
            try:
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)
            except Exception as error:  # pragma: no cover - the failure message is the point
                pytest.fail(f"README python block {i} failed: {type(error).__name__}: {error}\n{block}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
