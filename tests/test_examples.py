"""The examples run as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_digits_example_reaches_97_percent():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "digits.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy: 0.9"), out.stdout[-2000:]
    assert float(last.split(":")[1]) >= 0.97


def _run_example(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_flax_cnn_example_small():
    last = _run_example("flax_cnn.py", "--small")
    assert last.startswith("test accuracy:") and float(last.split(":")[1]) >= 0.8


def test_equinox_cnn_example_small():
    last = _run_example("equinox_cnn.py", "--small")  # 2 epochs: about 0.67
    assert last.startswith("test accuracy:") and float(last.split(":")[1]) >= 0.5


def test_charlm_example_small():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "charlm.py"), "--small"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    val = [float(l.split("validation loss")[1].split()[0]) for l in lines if "validation" in l]
    assert len(val) == 2 and val[-1] < np.log(256)  # learned something about bytes
    assert lines[-1].startswith("tokens/s: daskdl 2 workers")
