"""Every script in scripts/ answers --help with its usage and exit 0: a
benchmark or fuzzer whose help crashes (an unescaped % in argparse help, a
script reading sys.argv by hand) is found here, not by the next user."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help(name):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.lstrip().startswith("usage:"), r.stdout[:300]
