"""The examples of docs/distributed.md run: each block whose first line is "# Run: ..." is written to a
file and started as that line says (torchrun on CPU with gloo for the multi-process ones)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
RUN = re.compile(r"# Run: (torchrun --standalone --nproc-per-node=(\d) |python )example\.py")


def _examples():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    examples = []
    for block in blocks:
        match = RUN.match(block)
        if match:
            examples.append(pytest.param(block, int(match.group(2) or 1), id=f"{len(examples)}-{match.group(2) or 1}p"))
    return examples


EXAMPLES = _examples()


def test_the_doc_has_its_examples():
    # DDP, FSDP2, TP, FSDP2 + TP, and compile/checkpoint/autocast: one runnable example per engine.
    assert [param.values[1] for param in EXAMPLES] == [2, 2, 2, 4, 1]


@pytest.mark.slow
@pytest.mark.parametrize(("code", "processes"), EXAMPLES)
def test_doc_example_runs(tmp_path, code, processes):
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    if processes > 1:
        # --standalone: torchrun's rendezvous takes a free local port.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "example.py"]
    else:
        command = [sys.executable, "example.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A new session so that a hung run is killed with all its workers, not just torchrun.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"example did not finish within 240 s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-5000:]
