"""Session set-up shared by every test directory."""
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session):
    """Build the QEMU test guest (cached: about a second when up to date) before
    collection, so the QEMU tests find it whatever order they run in. Skipped
    when the run deselects them (-m "not qemu") or QEMU is not installed."""
    config = session.config
    if "not qemu" in (config.getoption("markexpr") or ""):
        return
    if shutil.which("qemu-system-x86_64") is None:
        return
    result = subprocess.run(["bash", str(ROOT / "scripts" / "build-guest.sh")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError("building the QEMU test guest failed (scripts/build-guest.sh):\n"
                           + result.stdout[-4000:])
