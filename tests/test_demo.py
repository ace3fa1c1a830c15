"""The README's first command: `neuranet demo` runs end to end on this machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_moves_tensors_around_the_ring(tmp_path) -> None:
    env = {**os.environ, "NEURANET_HOME": str(tmp_path), "COLUMNS": "160"}
    done = subprocess.run([sys.executable, "-m", "neuranet", "demo", "--mib", "8"], capture_output=True, text=True,
                          timeout=240, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for name in ("demo-a → demo-b", "demo-b → demo-c", "demo-c → demo-a"):
        assert name in out
    assert "all links delivered every tensor in order" in out
    assert out.count("direct") >= 3
    first, last = map(float, re.search(r"loss ([\d.]+) → ([\d.]+) over 80 steps", out).groups())
    assert last < first / 2  # it ends by training across the agents, and the loss falls
