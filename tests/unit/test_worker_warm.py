"""`pbt_worker.warm` on its own: one interpreter running a program once per job, each run as a fresh
`python SCRIPT` would see it, plus `pbt_worker.cached` and the driver's choice of warm commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pbt_operator.local.warm import warm_target
from pbt_operator.spec import SpecError
from pbt_worker import cache_clear, cached

PROGRAM = '''
import json, os, signal, sys
from pbt_worker import cached
seen = cached("seen", lambda: [])
job = json.loads(os.environ["PBT_SEGMENT"])
seen.append(job["n"])
print("out", job["n"], flush=False)
print("err", job["n"], file=sys.stderr)
state = {"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "leak": os.environ.get("LEAK"),
         "name": __name__, "seen": list(seen), "term_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}
with open(job["out"], "w") as f:
    json.dump(state, f)
os.environ["LEAK"] = "yes"
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.chdir("/")
import io, warnings
state["filters"] = len(warnings.filters)
with open(job["out"], "w") as f:
    json.dump(state, f)
warnings.simplefilter("ignore")
sys.stdout = io.StringIO()  # swallowed: the next job must print to its log again
if job.get("exit") is not None:
    sys.exit(job["exit"])
if job.get("raise"):
    raise ValueError("boom")
if job.get("die"):
    os._exit(7)
'''


class Worker:
    def __init__(self, tmp: Path, target: list[str]):
        jr, self.jw = os.pipe()
        self.rr, rw = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-m", "pbt_worker.warm", str(jr), str(rw), *target],
                                     cwd=tmp, pass_fds=(jr, rw), stdin=subprocess.DEVNULL)
        os.close(jr)
        os.close(rw)
        self.replies = os.fdopen(self.rr, "rb")
        self.tmp = tmp

    def job(self, n: int, **kw: object) -> tuple[int | None, dict[str, object], str]:
        out, log = self.tmp / f"state{n}.json", self.tmp / f"log{n}.txt"
        env = {"PBT_SEGMENT": json.dumps({"n": n, "out": str(out), **kw})}
        os.write(self.jw, json.dumps({"env": env, "log": str(log)}).encode() + b"\n")
        line = self.replies.readline()
        code = json.loads(line)["exit"] if line else None
        return code, json.loads(out.read_text()), log.read_text()

    def close(self) -> int:
        os.close(self.jw)
        return self.proc.wait(10)


@pytest.fixture
def script(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "prog").mkdir()
    p = tmp_path / "prog" / "train.py"
    p.write_text(PROGRAM)
    yield p


def test_each_job_sees_a_fresh_interpreter_but_the_cache_stays(tmp_path: Path, script: Path) -> None:
    w = Worker(tmp_path, [str(script), "--flag"])
    try:
        code, st, log = w.job(1)
        assert code == 0
        assert st["argv"] == [str(script), "--flag"] and st["name"] == "__main__"
        assert st["path0"] == str(script.parent) and st["cwd"] == str(tmp_path)
        assert st["leak"] is None and st["seen"] == [1] and st["term_default"] is True
        assert sorted(log.split()) == sorted(["out", "1", "err", "1"])  # both streams, C level too
        first_filters = st["filters"]
        code, st, log = w.job(2, exit=3)
        # the previous job's environment, working directory and signal handler did not carry over
        assert code == 3 and st["leak"] is None and st["cwd"] == str(tmp_path) and st["term_default"] is True
        assert st["seen"] == [1, 2]  # ... but pbt_worker.cached did
        assert st["filters"] == first_filters  # nor did the previous job's warnings filter
        assert "out 2" in log and "log1" not in log
        code, st, log = w.job(3, exit="bad things")
        assert code == 1 and "bad things" in log
        code, st, log = w.job(4, **{"raise": True})
        assert code == 1 and "ValueError: boom" in log and "Traceback" in log
        assert sorted((tmp_path / "log1.txt").read_text().split()) == sorted(["out", "1", "err", "1"])
        code, st, log = w.job(5, die=True)
        assert code is None and st["seen"] == [1, 2, 3, 4, 5]
        assert w.proc.wait(10) == 7
    finally:
        if w.proc.poll() is None:
            w.proc.kill()


def test_end_of_input_ends_the_worker(tmp_path: Path, script: Path) -> None:
    w = Worker(tmp_path, [str(script)])
    assert w.job(1)[0] == 0
    assert w.close() == 0


def test_module_form(tmp_path: Path, script: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(PROGRAM)
    w = Worker(tmp_path, ["-m", "pkg.train", "x"])
    try:
        code, st, _ = w.job(1)
        assert code == 0 and st["argv"] == [str(pkg / "train.py"), "x"] and st["path0"] == str(tmp_path)
    finally:
        w.close()


def test_warm_target(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    assert warm_target(["python", "train.py", "--a"], tmp_path) == ["train.py", "--a"]
    assert warm_target([sys.executable, str(tmp_path / "train.py")], tmp_path) == [str(tmp_path / "train.py")]
    assert warm_target(["python3.11", "-m", "pkg.train"], tmp_path) == ["-m", "pkg.train"]
    for cold in (["python", "missing.py"], ["python", "-c", "pass"], ["python", "-u", "train.py"],
                 ["bash", "train.sh"], ["./train.py"], ["python"], ["python", "-m"]):
        assert warm_target(cold, tmp_path) is None, cold


def test_spec_warm_field(make_spec: Callable[..., Any]) -> None:
    assert make_spec({}).worker.warm is True
    assert make_spec({"worker": {"executor": "process", "command": ["python", "t.py"], "warm": False}}).worker.warm is False
    with pytest.raises(SpecError, match=r"spec\.worker\.warm: must be true or false"):
        make_spec({"worker": {"executor": "process", "command": ["python", "t.py"], "warm": "no"}})


def test_cached_builds_once_even_under_threads() -> None:
    cache_clear()
    calls = []
    gate = threading.Event()

    def build() -> object:
        calls.append(1)
        gate.wait(2)
        return object()

    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(cached("k", build))) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(g) for g in got}) == 1

    def failing() -> object:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cached("f", failing)
    assert cached("f", lambda: 5) == 5  # a failed build stored nothing
    cache_clear("k")
    assert cached("k", lambda: 6) == 6
    cache_clear()


def test_a_failed_segments_error_keeps_the_head_of_a_long_last_line(tmp_path: Path) -> None:
    """The error of a segment that died without a result is its log's last line. It was cut from the
    last 300 bytes, so a long exception line lost its start ("exit code 1: ted, e.g. its writer ..."):
    the exception's type and first words must survive, the end is what gets shortened."""
    from pbt_operator.local.executors import _tail

    log = tmp_path / "seg.log"
    line = "pbt_worker.errors.CheckpointNotFoundError: no committed checkpoint at file:///x/ " + "detail " * 100
    log.write_text("Traceback (most recent call last):\n  File \"train.py\", line 3\n" + line + "\n")
    tail = _tail(log)
    assert tail.startswith("pbt_worker.errors.CheckpointNotFoundError: no committed checkpoint")
    assert len(tail) <= 400 and tail.endswith("...")
    log.write_text("short\n")
    assert _tail(log) == "short"
