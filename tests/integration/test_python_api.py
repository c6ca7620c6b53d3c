"""`pbt_operator.run(...)` from Python: a dict manifest and a function defined right here (a closure, as
in a notebook), resume after Ctrl-C, errors naming the field, determinism, `load_best`, and the CLI's
files unchanged (cli.cmd_run calls the same code)."""

from __future__ import annotations

import _thread
import copy
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pbt_operator
import pytest
import yaml
from pbt_operator import cli

ROOT = Path(__file__).resolve().parents[2]
QUADRATIC = ROOT / "examples" / "quadratic" / "populationtraining.yaml"


def quadratic_doc(**spec: Any) -> dict[str, Any]:
    """The quadratic example's manifest as a dict, without its worker (the test's function trains)."""
    doc = yaml.safe_load(QUADRATIC.read_text())
    del doc["spec"]["worker"]
    doc["spec"].update(spec)
    return doc


def quadratic_function(calls: list[tuple[int, int]], learning_rate: float = 0.01) -> Any:
    """The PBT paper's toy as a closure: it counts its calls in `calls` and captures `learning_rate`, so
    a run that imported it again (in another process, or by module:name) could not work."""

    def segment(seg: Any) -> dict[str, float]:
        calls.append((seg.member, seg.index))
        state = seg.restore()
        theta = list(state["theta"]) if state is not None else [0.9, 0.9]
        h0, h1 = float(seg.hyperparameters["h0"]), float(seg.hyperparameters["h1"])
        for _ in range(seg.steps_budget):
            theta[0] += learning_rate * (-2.0 * h0 * theta[0])
            theta[1] += learning_rate * (-2.0 * h1 * theta[1])
        seg.save({"theta": theta, "member": seg.member, "segment": seg.index, "weights": np.array(theta)})
        return {"score": 1.2 - (theta[0] ** 2 + theta[1] ** 2), "theta0": theta[0]}

    return segment


def done_refs(run_dir: Path) -> list[tuple[int, int]]:
    out = []
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["status"] == "done":
            out.append((r["suggestion"]["member"], r["suggestion"]["segment"]))
    return out


# --------------------------------------------------------------------------------------------------


def test_a_dict_and_a_closure_train_and_pbt_beats_the_population_alone(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    pbt = pbt_operator.run(quadratic_doc(), function=quadratic_function(calls), out=tmp_path / "pbt")
    alone_calls: list[tuple[int, int]] = []
    alone = pbt_operator.run(quadratic_doc(exploit={"strategy": "none"}), function=quadratic_function(alone_calls),
                             out=tmp_path / "alone", plot=False)
    assert isinstance(pbt, pbt_operator.RunResult) and pbt.ok and alone.ok
    assert pbt.failed is None and pbt.finished is None and not pbt.interrupted
    total = 16 * 20
    assert len(calls) == len(alone_calls) == total  # this process's closure ran every segment
    assert sorted(done_refs(pbt.run_dir)) == sorted(calls)
    assert pbt.run_dir == (tmp_path / "pbt").resolve()
    # the same seed: the same initial population
    assert ({r.member: r.suggestion.hyperparameters for r in pbt.records if r.segment == 0}
            == {r.member: r.suggestion.hyperparameters for r in alone.records if r.segment == 0})
    assert pbt.best is not None and alone.best is not None
    assert pbt.best["score"] > 1.15, pbt.best
    assert pbt.best["score"] > alone.best["score"] + 0.1, (pbt.best["score"], alone.best["score"])
    # the result is what pbt export / best.json say
    best_json = json.loads((pbt.run_dir / "best.json").read_text())
    assert {k: best_json[k] for k in pbt.best} == pbt.best
    assert pbt.schedule == best_json["schedule"] and pbt.schedule[-1]["segment"] == pbt.best["segment"]
    assert len(pbt.records) == total and all(r.status == "done" for r in pbt.records)
    for name in ("results.jsonl", "suggestions.jsonl", "lineage.json", "best.json", "run.json", "manifest.json",
                 "plot.png"):
        assert (pbt.run_dir / name).exists(), name
    # the results commands read the folder (manifest.json holds the document as run)
    assert cli.main(["status", str(pbt.run_dir)]) == 0
    opened = pbt_operator.RunResult.open(pbt.run_dir)
    assert opened.best == pbt.best and len(opened.records) == total


def test_load_best_returns_what_the_best_segment_saved(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    res = pbt_operator.run(quadratic_doc(population=4, budget={"segments": 4}), function=quadratic_function(calls),
                           out=tmp_path / "run", plot=False)
    assert res.best is not None
    saved = res.load_best()
    assert (saved["member"], saved["segment"]) == (res.best["member"], res.best["segment"])
    assert 1.2 - (saved["theta"][0] ** 2 + saved["theta"][1] ** 2) == pytest.approx(res.best["score"])
    assert isinstance(saved["weights"], np.ndarray) and list(saved["weights"]) == saved["theta"]
    # a file the best segment stored with save_file comes back as a local path
    def save_file(seg: Any) -> float:
        src = tmp_path / f"m{seg.member}-s{seg.index}.txt"
        src.write_text(f"member {seg.member} segment {seg.index}")
        seg.save_file(src)
        return float(seg.member + seg.index)

    res = pbt_operator.run(quadratic_doc(population=2, budget={"segments": 2}), function=save_file,
                           out=tmp_path / "files", plot=False)
    assert res.best is not None
    path = res.load_best(dest=tmp_path / "restored")
    assert Path(path).read_text() == f"member {res.best['member']} segment {res.best['segment']}"
    assert Path(path).parent == tmp_path / "restored"


def test_a_bad_field_raises_naming_it_with_the_message_the_cli_prints(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = quadratic_doc(population=1)
    with pytest.raises(pbt_operator.RunError) as raised:
        pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run")
    assert "spec.population: must be >= 2" in str(raised.value)
    assert any(p.startswith("spec.population:") for p in raised.value.problems)
    assert not (tmp_path / "run").exists()
    # the same document as a file: the same exception from run(), the same message from the CLI
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**doc, "spec": {**doc["spec"], "worker": {"executor": "inline",
                                                                              "function": "quadratic:segment"}}}))
    with pytest.raises(pbt_operator.RunError) as from_file:
        pbt_operator.run(path, out=tmp_path / "run")
    assert str(from_file.value) == str(raised.value)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"pbt run: {raised.value}\n"
    # the settings that are flags on the command line, and the callable
    with pytest.raises(pbt_operator.RunError, match=r"^seed: must be >= 0 \(got -1\)$"):
        pbt_operator.run(quadratic_doc(), function=quadratic_function([]), seed=-1)
    with pytest.raises(pbt_operator.RunError, match=r"^parallelism: must be >= 1"):
        pbt_operator.run(quadratic_doc(), function=quadratic_function([]), parallelism=0)
    with pytest.raises(pbt_operator.RunError, match=r"^function: must be a callable"):
        pbt_operator.run(quadratic_doc(), function="quadratic:segment")  # type: ignore[arg-type]
    # a bad name= is the argument's fault, not the manifest's metadata.name (pbt run says --name)
    with pytest.raises(pbt_operator.RunError) as bad_name:
        pbt_operator.run(quadratic_doc(), function=quadratic_function([]), name="Bad_Name")
    assert bad_name.value.problems == ["name: must be a DNS label of at most 40 characters (lower-case letters, "
                                       "digits, '-'), got 'Bad_Name'"], bad_name.value
    assert cli.main(["run", str(path), "--name", "Bad_Name", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "\n  --name: must be a DNS label" in capsys.readouterr().err
    bad_meta = {**quadratic_doc(), "metadata": {"name": "Bad_Name"}}
    with pytest.raises(pbt_operator.RunError, match=r"\n  metadata\.name: must be a DNS label"):
        pbt_operator.run(bad_meta, function=quadratic_function([]))
    # without a function the worker is required, as in a file
    with pytest.raises(pbt_operator.RunError, match=r"spec\.worker\.command: is required"):
        pbt_operator.run(quadratic_doc(), out=tmp_path / "run")
    # a folder that already holds a run
    pbt_operator.run(quadratic_doc(population=2, budget={"segments": 1}), function=quadratic_function([]),
                     out=tmp_path / "done", plot=False)
    with pytest.raises(pbt_operator.RunError, match="pass resume=True to continue it, or fresh=True"):
        pbt_operator.run(quadratic_doc(population=2, budget={"segments": 1}), function=quadratic_function([]),
                         out=tmp_path / "done")


def test_same_seed_same_decisions(tmp_path: Path) -> None:
    """The decisions depend on the seed and the order segments finish in: one at a time (parallelism 1),
    the journal is the same line for line; synchronous mode decides per generation, so with segments
    finishing in any order the decisions are the same set."""

    def decisions(out: str, seed: int, **spec: Any) -> tuple[list[str], list[float | None]]:
        res = pbt_operator.run(quadratic_doc(population=6, budget={"segments": 6}, **spec),
                               function=quadratic_function([]), out=tmp_path / out, seed=seed, plot=False)
        return ((tmp_path / out / "suggestions.jsonl").read_text().splitlines(), [r.score for r in res.records])

    a, b, c = decisions("a", 7, parallelism=1), decisions("b", 7, parallelism=1), decisions("c", 8, parallelism=1)
    assert a == b
    assert a[0] != c[0]
    assert json.loads((tmp_path / "a" / "run.json").read_text())["fingerprint"] != \
        json.loads((tmp_path / "c" / "run.json").read_text())["fingerprint"]
    sync = [decisions(out, 7, parallelism=3, mode="synchronous") for out in ("s1", "s2")]
    assert sorted(sync[0][0]) == sorted(sync[1][0]) and sorted(map(str, sync[0][1])) == sorted(map(str, sync[1][1]))



@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """Ctrl-C as a terminal delivers it: `_thread.interrupt_main()` only raises KeyboardInterrupt where
    SIGINT has Python's default handler, and a suite started in the background (`cmd &` in a
    non-interactive shell) inherits SIGINT ignored, where it would do nothing and these tests fail."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_stops_and_resume_repeats_no_finished_segment(tmp_path: Path, ctrl_c: None) -> None:
    phase = {"now": "first"}
    calls: dict[str, list[tuple[int, int]]] = {"first": [], "second": []}
    lock = threading.Lock()

    def segment(seg: Any) -> float:
        with lock:
            mine = calls[phase["now"]]
            mine.append((seg.member, seg.index))
            if phase["now"] == "first" and len(mine) == 25:
                _thread.interrupt_main()  # what Ctrl-C does to the main thread
        seg.save({"member": seg.member, "segment": seg.index})
        return float(seg.hyperparameters["h0"])

    doc = quadratic_doc(population=6, budget={"segments": 10}, parallelism=2)
    with pytest.raises(KeyboardInterrupt):
        pbt_operator.run(doc, function=segment, out=tmp_path / "run")
    finished = done_refs(tmp_path / "run")
    assert 0 < len(finished) < 60
    assert not (tmp_path / "run" / "best.json").exists()
    stopped = pbt_operator.RunResult.open(tmp_path / "run")
    assert stopped.interrupted and not stopped.ok and len(stopped.records) == len(finished)
    # another function (another qualified name) is another run
    # (and the message says so: "the manifest (or seed) changed" sent users looking for a manifest edit)
    with pytest.raises(pbt_operator.RunError, match=r"the manifest, seed or function \(.*:quadratic_function\."
                                                    r"<locals>\.segment\) changed since .*use fresh=True"):
        pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", resume=True)
    phase["now"] = "second"
    res = pbt_operator.run(doc, function=segment, out=tmp_path / "run", resume=True)
    assert res.ok and res.summary is not None
    assert not set(finished) & set(calls["second"]), "a finished segment ran again"
    refs = done_refs(tmp_path / "run")
    assert sorted(refs) == sorted(set(refs)) and len(refs) == 60
    assert res.summary.ran == len(calls["second"]) == 60 - len(finished)


def test_the_cli_writes_the_same_files_through_the_same_code(tmp_path: Path) -> None:
    """`pbt run FILE` and `pbt_operator.run(FILE)`: the same journal, outputs and fingerprint (so either
    resumes the other's folder)."""
    doc = yaml.safe_load(QUADRATIC.read_text())
    doc["spec"].update(parallelism=1, population=6, budget={"segments": 5})
    path = tmp_path / "quadratic.yaml"
    path.write_text(yaml.safe_dump(doc))
    (tmp_path / "quadratic.py").write_text((QUADRATIC.parent / "quadratic.py").read_text())
    sys.modules.pop("quadratic", None)
    try:
        assert cli.main(["run", str(path), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
        res = pbt_operator.run(path, out=tmp_path / "api")
    finally:
        sys.modules.pop("quadratic", None)
    cli_dir, api_dir = tmp_path / "cli", res.run_dir
    assert sorted(p.name for p in cli_dir.iterdir()) == sorted(p.name for p in api_dir.iterdir())
    for name in ("results.jsonl", "suggestions.jsonl"):
        strip = [{k: v for k, v in json.loads(line).items() if k != "duration"}
                 for line in (cli_dir / name).read_text().splitlines()]
        assert strip == [{k: v for k, v in json.loads(line).items() if k != "duration"}
                         for line in (api_dir / name).read_text().splitlines()], name
    for name in ("best.json", "lineage.json"):
        assert (cli_dir / name).read_text().replace(str(cli_dir), "") == \
            (api_dir / name).read_text().replace(str(api_dir), ""), name
    assert json.loads((cli_dir / "manifest.json").read_text()) == json.loads((api_dir / "manifest.json").read_text())
    fp = json.loads((cli_dir / "run.json").read_text())["fingerprint"]
    assert fp == json.loads((api_dir / "run.json").read_text())["fingerprint"]
    # so the CLI resumes the API's folder (nothing left to run)
    assert cli.main(["run", str(path), "--out", str(api_dir), "--quiet", "--resume"]) == 0


def test_a_function_defined_in_main(tmp_path: Path) -> None:
    """A script's (or notebook's) function lives in __main__, which no other process can import."""
    doc = quadratic_doc(population=4, budget={"segments": 5})
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import pbt_operator

        def segment(seg):
            state = seg.restore()
            theta = state if state is not None else [0.9, 0.9]
            h0, h1 = seg.hyperparameters["h0"], seg.hyperparameters["h1"]
            for _ in range(seg.steps_budget):
                theta = [theta[0] - 0.02 * h0 * theta[0], theta[1] - 0.02 * h1 * theta[1]]
            seg.save(theta)
            return 1.2 - (theta[0] ** 2 + theta[1] ** 2)

        if __name__ == "__main__":
            res = pbt_operator.run({doc!r}, function=segment, out=sys.argv[1], resume=len(sys.argv) > 2)
            print(json.dumps({{"ok": res.ok, "score": res.best["score"], "saved": res.load_best()}}))
    """))
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["ok"] and 1.2 - (got["saved"][0] ** 2 + got["saved"][1] ** 2) == pytest.approx(got["score"])
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())["document"]
    assert saved["spec"]["worker"] == {"executor": "inline", "function": "__main__:segment", "pool": "threads"}
    again = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), "--resume"], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_the_worker_env_stays_and_the_dict_is_not_changed(tmp_path: Path) -> None:
    """The function replaces spec.worker's command; its env (the storage's settings, say) stays."""
    calls: list[tuple[int, int]] = []
    doc = quadratic_doc(population=2, budget={"segments": 2},
                        worker={"executor": "process", "command": ["false"], "env": {"A": "1"}})
    before = copy.deepcopy(doc)
    res = pbt_operator.run(doc, function=quadratic_function(calls), out=tmp_path / "run", plot=False)
    assert doc == before and res.ok and len(calls) == 4
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())["document"]
    assert saved["spec"]["worker"]["env"] == {"A": "1"} and saved["spec"]["worker"]["executor"] == "inline"


def test_load_best_from_s3_through_the_worker_env(s3_env: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An s3:// checkpoint store whose endpoint and credentials a manifest gives in spec.worker.env:
    load_best reads it with them, as `pbt run`'s own storage calls do, and leaves the environment as it was."""
    import os

    from pbt_worker.storage import reset_storage_cache

    bucket = s3_env["PBT_TEST_BUCKET"]
    worker_env = {k: s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3",
                                         "AWS_REGION", "AWS_EC2_METADATA_DISABLED")}
    doc = quadratic_doc(population=3, budget={"segments": 3}, storage={"uri": f"s3://{bucket}/runs"},
                        worker={"env": worker_env})
    res = pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", plot=False)
    assert res.ok and res.best is not None
    assert res.best["checkpoint"].startswith(f"s3://{bucket}/runs/quadratic/m")
    for k in worker_env:  # now only the manifest knows where the store is
        monkeypatch.delenv(k, raising=False)
    reset_storage_cache()
    saved = res.load_best()
    assert (saved["member"], saved["segment"]) == (res.best["member"], res.best["segment"])
    assert "AWS_ENDPOINT_URL_S3" not in os.environ
    assert pbt_operator.RunResult.open(res.run_dir).load_best()["theta"] == saved["theta"]



def test_the_functions_storage_reaches_s3_through_the_worker_env_alone(
        s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's endpoint and credentials only in spec.worker.env: the function's seg.save/seg.restore
    (threads of this process) use them as a worker process would, and os.environ, which the caller's
    other threads share, is never changed for it."""
    import os

    from pbt_worker.storage import reset_storage_cache

    bucket = s3_env["PBT_TEST_BUCKET"]
    worker_env = {k: s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3",
                                         "AWS_REGION", "AWS_EC2_METADATA_DISABLED")}
    for k in worker_env:
        monkeypatch.delenv(k, raising=False)
    reset_storage_cache()
    seen: list[str | None] = []
    inner = quadratic_function([])

    def segment(seg: Any) -> Any:
        seen.append(os.environ.get("AWS_ENDPOINT_URL_S3"))
        return inner(seg)

    doc = quadratic_doc(population=2, budget={"segments": 3}, storage={"uri": f"s3://{bucket}/runs"},
                        worker={"env": worker_env})
    # nor for the driver's own storage calls (the store's check before the run, the deletes at its end,
    # load_best): they set spec.worker.env in os.environ while they ran, under every other thread
    written: list[str] = []
    environ_set = type(os.environ).__setitem__

    def spy(self: Any, key: str, value: str) -> None:
        written.append(key)
        environ_set(self, key, value)

    monkeypatch.setattr(type(os.environ), "__setitem__", spy)
    res = pbt_operator.run(doc, function=segment, out=tmp_path / "run", plot=False)
    assert res.ok, res.failed
    assert len(seen) == 6 and set(seen) == {None}
    assert res.load_best()["theta"]
    assert not [k for k in written if k in worker_env], written
    keys = [o["Key"] for page in s3_client(s3_env).get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.startswith("runs/quadratic/m") and k.endswith("_COMMITTED") for k in keys), keys
    restored = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "done" for r in restored)
    assert "AWS_ENDPOINT_URL_S3" not in os.environ


def s3_client(s3_env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"], region_name=s3_env["AWS_REGION"],
                        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"])


def test_gpu_settings_as_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gpus= / gpus_per_member= are --gpus / --gpus-per-member: refused before the folder exists when the
    machine has too few, and for a function (this process: every member sees every GPU) said, not applied."""
    doc = quadratic_doc(population=2, budget={"segments": 1})
    with pytest.raises(pbt_operator.RunError,
                       match=r"^gpus_per_member: 2 GPUs per member, but gpus shows 1 \(0\): lower it with gpus_per_member=1"):
        pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", gpus="0", gpus_per_member=2)
    assert not (tmp_path / "run").exists()
    res = pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", gpus="0,1",
                           gpus_per_member=1, plot=False)
    assert res.ok
    err = capsys.readouterr().err
    # Python's own forms: a list of devices is --gpus 0,1; a bare number (a device? a count?) is refused
    # naming the argument (it was an AttributeError from inside the GPU plan), as is an out that is no path
    res = pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", gpus=[0, 1], fresh=True,
                           plot=False)
    assert res.ok and capsys.readouterr().err == (
        "pbt_operator.run: no GPU slots for the function: it runs in this process, where every member sees every "
        "GPU (there would be 2 slots from gpus: 0, 1); set a spec.worker.command for one GPU per member\n")
    with pytest.raises(pbt_operator.RunError, match=r"^gpus: must be devices .*got 2; for 2 GPUs per member "
                                                    r"pass gpus_per_member=2"):
        pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run2", gpus=2)  # type: ignore[arg-type]
    with pytest.raises(pbt_operator.RunError, match=r"^out: must be a folder's path \(got int\)"):
        pbt_operator.run(doc, function=quadratic_function([]), out=5)  # type: ignore[arg-type]
    assert not (tmp_path / "run2").exists()
    assert "every member sees every GPU" in err
    # said once, in run()'s terms: a Python caller has no `pbt run` and no --gpus flag
    assert err.count("every member sees every GPU") == 1
    assert err.startswith("pbt_operator.run: ") and "--gpus" not in err and "gpus: 0, 1" in err


def test_resume_and_fresh_together_are_refused_and_the_run_is_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both at once deleted the folder (fresh) and then said there was no run to resume: a finished run
    lost to a flag combination that cannot mean anything."""
    doc = quadratic_doc(population=2, budget={"segments": 1})
    pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", plot=False)
    with pytest.raises(pbt_operator.RunError, match="exclude each other"):
        pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", resume=True, fresh=True)
    assert (tmp_path / "run" / "results.jsonl").exists()
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({**doc, "spec": {**doc["spec"], "worker": {"executor": "inline",
                                                                              "function": "quadratic:segment"}}}))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--resume", "--fresh", "--quiet"]) == 2
    assert "--resume and --fresh exclude each other" in capsys.readouterr().err
    assert (tmp_path / "run" / "results.jsonl").exists()


def test_replay_of_a_run_whose_function_lived_in_main_says_what_to_pass(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A notebook's or a script's function is `__main__:NAME` in manifest.json; replay tried to import
    it, printed its header and then 'module '__main__' has no function ...', never saying why or what
    to do (docs/python.md: replay needs --manifest)."""
    fn = quadratic_function([])
    fn.__module__ = "__main__"
    res = pbt_operator.run(quadratic_doc(population=2, budget={"segments": 1}), function=fn, out=tmp_path / "run",
                           plot=False)
    assert res.ok
    capsys.readouterr()
    assert cli.main(["replay", str(tmp_path / "run"), "--out", str(tmp_path / "replay")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("pbt replay: the run's spec.worker.function __main__:segment was a function of the "
                          "Python process that ran it") and "pass --manifest" in err
    assert not (tmp_path / "replay").exists()


def test_notes_once_and_yaml_text_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """spec.worker.pool: processes with a function was said twice (the document is made twice: the
    manifest, the fingerprint); YAML text passed as the manifest was 'invalid PopulationTraining:
    apiVersion: ...: no such file'."""
    doc = quadratic_doc(population=2, budget={"segments": 1}, worker={"pool": "processes"})
    assert pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", plot=False).ok
    assert capsys.readouterr().err == ("pbt_operator.run: spec.worker.pool: processes ignored: a Python function "
                                       "runs in threads\n")
    with pytest.raises(pbt_operator.RunError, match=r"^manifest: a str is a file's path; for YAML text pass "
                                                    r"yaml\.safe_load\(text\)"):
        pbt_operator.run(yaml.safe_dump(doc), function=quadratic_function([]), out=tmp_path / "run2")


def test_resume_right_after_ctrl_c_waits_for_the_segments_still_running(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], ctrl_c: None) -> None:
    """A segment in a thread cannot be stopped: after Ctrl-C it goes on and saves its checkpoint. A
    notebook's `run(..., resume=True)` right after ran the same segment again beside it, both writing
    one checkpoint (the one kept could be the unrecorded run's)."""
    spans: list[tuple[int, int, float, float]] = []
    lock = threading.Lock()

    started = threading.Event()

    def slow(seg: Any) -> float:
        t0 = time.monotonic()
        started.set()
        seg.restore()
        time.sleep(0.8)
        seg.save({"member": seg.member})
        with lock:
            spans.append((seg.member, seg.index, t0, time.monotonic()))
        return float(seg.member)

    doc = quadratic_doc(population=2, parallelism=2, budget={"segments": 2})

    def interrupt() -> None:  # Ctrl-C while the first segments run
        started.wait(30)
        time.sleep(0.2)
        _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        pbt_operator.run(doc, function=slow, out=tmp_path / "run", plot=False)
    res = pbt_operator.run(doc, function=slow, out=tmp_path / "run", resume=True, plot=False)
    assert res.ok
    for i, (m, s, a0, a1) in enumerate(spans):
        for n, t, b0, b1 in spans[i + 1:]:
            assert (m, s) != (n, t) or a1 <= b0 or b1 <= a0, f"member {m} segment {s} ran twice at once"
    assert "of the interrupted run, still running in this process" in capsys.readouterr().err


def test_an_opened_failed_run_has_its_failure_log(tmp_path: Path) -> None:
    """RunResult.open of a failed run had `failed` None (the engine rebuilt from results.jsonl does not
    know how it ended) and `failure_log` None, though best.json and the log are in the folder."""

    def boom(seg: Any) -> float:
        raise ValueError("bad data")

    doc = quadratic_doc(population=2, budget={"segments": 1}, failurePolicy={"maxRetries": 0, "onExhausted": "fail"})
    res = pbt_operator.run(doc, function=boom, out=tmp_path / "run", plot=False)
    assert res.failed and res.failure_log is not None
    # the log of the attempt the failure names: both members fail at once, and the engine keeps the first
    # failure as the reason while failure_log was the last failure's log
    member = int(res.failed.split("member ")[1].split()[0])
    assert res.failure_log.name.startswith(f"m{member:03d}-s00000-")
    opened = pbt_operator.RunResult.open(tmp_path / "run")
    assert opened.failed == res.failed
    assert opened.failure_log == res.failure_log.resolve() and "ValueError: bad data" in opened.failure_log.read_text()
    # found by the engine's (member, segment, attempt), which best.json keeps, not by the message's words
    best_json = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best_json["failedAttempt"] == {"member": member, "segment": 0, "attempt": 0}
    best_json["failed"] = "SegmentFailed: worded some other way"
    (tmp_path / "run" / "best.json").write_text(json.dumps(best_json))
    assert pbt_operator.RunResult.open(tmp_path / "run").failure_log == res.failure_log.resolve()


def test_a_returned_score_that_differs_from_the_reported_one_is_said_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """seg.report(0.25) and then `return 0.75`: the returned score counts, and the run says so, once,
    naming both values (it used to win silently)."""

    def segment(seg: Any) -> float:
        seg.report(0.25)
        return 0.75

    def agreeing(seg: Any) -> float:
        seg.report(0.5)
        return 0.5

    doc = quadratic_doc(population=2, budget={"segments": 2})
    res = pbt_operator.run(doc, function=segment, out=tmp_path / "run", plot=False)
    err = capsys.readouterr().err
    assert res.ok and {r.score for r in res.records} == {0.75}
    assert err.count("the returned score counts") == 1, err
    assert "seg.report(score=0.25) and returned 0.75" in err and err.startswith("pbt_operator.run: member ")
    res = pbt_operator.run(doc, function=agreeing, out=tmp_path / "run2", plot=False)
    assert res.ok and "returned" not in capsys.readouterr().err


def test_the_inline_gpu_note_shortens_device_uuids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The note for a function (no GPU slots: it runs in this process) printed whole UUIDs, where the
    GPU plan's own note shortens them."""
    a, b = "GPU-8f1c2a3b-1111-2222-3333-444455556666", "GPU-0d9e7f61-1111-2222-3333-444455556666"
    doc = quadratic_doc(population=2, budget={"segments": 1})
    doc["spec"]["template"] = {"spec": {"containers": [{"name": "t", "image": "x",
                                                        "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}
    res = pbt_operator.run(doc, function=quadratic_function([]), out=tmp_path / "run", gpus=[a, b], plot=False)
    err = capsys.readouterr().err
    assert res.ok and "(there would be 2 slots from gpus: GPU-8f1c2a3b, GPU-0d9e7f61)" in err, err
    assert "1111-2222" not in err


def test_a_long_exception_of_the_function_is_cut_with_a_visible_mark(tmp_path: Path) -> None:
    def boom(seg: Any) -> float:
        raise ValueError("bad " * 1000)

    doc = quadratic_doc(population=2, budget={"segments": 1}, failurePolicy={"maxRetries": 0, "onExhausted": "fail"})
    res = pbt_operator.run(doc, function=boom, out=tmp_path / "run", plot=False)
    errors = [r.error for r in res.records if r.error]
    assert errors and all(e.endswith("...") for e in errors), errors[0][-40:]


def test_boolean_choices_train_as_booleans_with_pb2_and_perturb(tmp_path: Path) -> None:
    """`choices: [true, false]` (YAML's booleans): the function gets True/False, never the strings, PB2
    models the choice like any categorical, and the better value wins."""
    seen: list[object] = []

    def segment(seg: Any) -> dict[str, float]:
        flag = seg.hyperparameters["flag"]
        seen.append(flag)
        state = seg.restore() or {"x": 0.0}
        x = state["x"] + seg.steps_budget * (1.0 if flag is True else 0.2) * float(seg.hyperparameters["lr"])
        seg.save({"x": x})
        return {"score": x}

    space = {"flag": {"type": "categorical", "choices": [True, False], "initial": {"choices": [False]}},
             "lr": {"type": "float", "min": 0.5, "max": 1.0}}
    for explore in ({"strategy": "pb2"}, {"strategy": "perturb", "resampleProbability": 0.5}):
        seen.clear()
        res = pbt_operator.run(quadratic_doc(population=4, parallelism=2, hyperparameters=space,
                                             budget={"segments": 12}, explore=explore),
                               function=segment, out=tmp_path / explore["strategy"], plot=False)
        assert res.ok and res.best is not None
        assert seen and all(type(v) is bool for v in seen), {type(v) for v in seen}
        assert seen[:4] == [False] * 4  # the initial subset
        assert res.best["hyperparameters"]["flag"] is True, (explore, res.best)
        # the run folder's files keep the type (JSON true), so a resume decides the same
        best_json = json.loads((res.run_dir / "best.json").read_text())
        assert best_json["hyperparameters"]["flag"] is True
