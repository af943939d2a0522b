"""The fleet walkthrough's --quick mode: a fresh output folder; it trains, converts, starts Mosquitto,
the controller with its dashboard, 20 simulated devices and a real agent, and must end with the
canary catching v2 and v3 promoted from shadow to everyone. The driver runs directly with this
interpreter: walkthrough.sh is setup (.ci/setup.sh, mosquitto) and then exactly this, and its setup
must not rewrite the environment the suite runs in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_fleet_walkthrough_quick_mode_runs_with_one_command(tmp_path):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    script = (ROOT / "examples" / "fleet" / "walkthrough.sh").read_text()
    assert "exec .venv/bin/python examples/fleet/walkthrough.py \"$@\"" in script
    done = subprocess.run([sys.executable, "examples/fleet/walkthrough.py", "--quick", "--out", str(tmp_path / "fleet")],
                          cwd=ROOT, capture_output=True, text=True, timeout=540, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "rollout 2: aborted at stage 1 of 3" in output and "prediction_psi" in output, output[-3000:]
    assert "never saw v2: {'1.0.0': 21}" in output
    assert "shadow verdict: pass" in output
    assert "rollout 3: done: {'3.0.0': 21}" in output
    assert "in the shadow stage it compared v3 with v1" in output  # the real agent ran it in shadow too
    assert "open the dashboard: http://127.0.0.1:" in output
