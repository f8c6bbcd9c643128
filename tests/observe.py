"""Helpers for the looking-inside tests: a backend with its control socket,
a connected in-process frontend, a blocking client run off the trio thread,
and a checker for the field tables of docs/json.md."""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from vhostnet.observe.control import ControlClient, ControlServer
from vhostnet.launch.serve import serve_backend

from .device.conftest import make_server
from vhostnet.testing.frontend import Frontend

DOCS = Path(__file__).resolve().parent.parent / "docs" / "json.md"


@pytest.fixture
def sockdir():
    # Short: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be long.
    d = tempfile.mkdtemp(prefix="vn-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def backend(sockdir, nursery):
    # No safety poll: these tests look at chains posted and not yet kicked,
    # which it would take within 10 ms (tests/device/test_habits.py tests it).
    srv = make_server(sockdir / "v.sock", safety_poll=False)
    ctl = ControlServer(srv, str(sockdir / "v.sock.ctl"))
    await nursery.start(serve_backend, srv, ctl)
    yield srv, ctl


@pytest.fixture
async def guest(backend):
    """A frontend connected to the backend, handshaken, RX buffers posted."""
    srv, _ = backend
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    fe.post_rx()
    fe.rx.kick()
    yield fe
    await fe.close()
    with trio.move_on_after(2):
        while srv.current is not None:
            await trio.sleep(0.005)
    fe.release()


async def ask(path: str, cmd: str, **kw):
    """One request through the real blocking client, in a thread."""
    def go():
        with ControlClient(path) as c:
            return c.request(cmd, **kw)
    return await trio.to_thread.run_sync(go)


async def cli(*argv: str) -> int:
    """vhostnet's main() in a thread (it blocks); output goes to capsys."""
    from vhostnet.launch.cli import main
    return await trio.to_thread.run_sync(main, list(argv))


# -- docs/json.md -----------------------------------------------------------------

_CELL = re.compile(r"(?<!\\)\|")   # a cell border: a "|" not escaped as "\|"


def documented(section: str) -> dict[str, str]:
    """{field path: type} from the table under '## SECTION' in docs/json.md."""
    out = {}
    inside = False
    for line in DOCS.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == section
            continue
        cells = [c.strip() for c in _CELL.split(line)] if inside and line.startswith("| `") else []
        if len(cells) >= 4:
            out[cells[1].strip("`")] = cells[2].replace("\\|", "|")
    assert out, f"no field table under ## {section} in {DOCS}"
    return out


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "null": type(None),
          "list": list, "object": dict, "map": dict, "[map]": list}


def _type_ok(value, spec: str) -> bool:
    for alt in spec.rstrip("?").split("|"):
        t = _TYPES[alt.strip()]
        if isinstance(value, bool) and t in (int, (int, float)):
            continue
        if isinstance(value, t):
            return True
    return False


def _walk(value, path: str, spec: dict, found: set, problems: list) -> None:
    """Check VALUE at PATH, then its fields (list items as PATH[])."""
    if path and not path.endswith("[]"):
        if path not in spec:
            problems.append(f"{path}: in the output, not in docs/json.md")
            return
        found.add(path)
        if not _type_ok(value, spec[path]):
            problems.append(f"{path}: {value!r} is not {spec[path]}")
        if spec[path].rstrip("?") in ("map", "[map]"):
            return
    if isinstance(value, dict):
        for k, v in value.items():
            _walk(v, f"{path}.{k}" if path else k, spec, found, problems)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                _walk(item, f"{path}[]", spec, found, problems)


def check_doc(doc: dict, section: str, *, allow_missing=()) -> None:
    """The document matches docs/json.md both ways (fields of empty lists, optional
    fields and ALLOW_MISSING prefixes excepted)."""
    spec = documented(section)
    found: set = set()
    problems: list = []
    _walk(doc, "", spec, found, problems)
    for path, typ in spec.items():
        if path in found or typ.endswith("?") or any(path.startswith(p) for p in allow_missing):
            continue
        problems.append(f"{path}: documented, missing from the output")
    assert not problems, "docs/json.md and the output disagree:\n  " + "\n  ".join(problems)
