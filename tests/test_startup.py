"""Light start-up: help, presets and cache listing never import torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
sys.argv = ["hybridprune", *{argv!r}]
from hybridprune.cli.main import main
try:
    main()
except SystemExit:
    pass
heavy = sorted(name for name in ("torch", "transformers", "datasets", "safetensors", "accelerate") if name in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["presets"], ["cache", "list"], ["eval", "--help"]])
def test_no_heavy_imports(argv: list[str], tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120,
                          env={"HYBRIDPRUNE_CACHE": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY=", done.stdout[-500:]


def test_import_hybridprune_is_light():
    done = subprocess.run([sys.executable, "-c", "import hybridprune, sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
