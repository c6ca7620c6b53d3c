"""`pbt status | plot | export | replay` on a local run folder (the quadratic example, run for real).

The run is made once per module with the real `pbt run` command; each test reads it through the same
command line a user types (in-process `main([...])` so output is captured, plus one subprocess call to
prove the console script works).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pbt_operator.cli import main
from pbt_operator.core.lineage import chain
from pbt_operator.local.plots import figure, html, plot_data
from pbt_operator.results_source import infer_spec, load_local

ROOT = Path(__file__).resolve().parents[2]
QUADRATIC = ROOT / "examples" / "quadratic" / "populationtraining.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results") / "quadratic"
    p = subprocess.run([sys.executable, "-m", "pbt_operator.cli", "run", str(QUADRATIC), "--fresh", "--quiet",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "manifest.json").exists(), "pbt run remembers its manifest for the results commands"
    return out


def pbt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def best_doc(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "best.json").read_text())


def test_status_shows_members_and_best_lineage(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = pbt(capsys, "status", str(run_dir))
    assert rc == 0
    best = best_doc(run_dir)
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:5] == ["member", "seg", "steps", "score", "parent"])
    rows = lines[head + 1: head + 17]
    assert [int(r.split()[0].rstrip("*")) for r in rows] == list(range(16))
    assert all(r.split()[1] == "19" for r in rows)  # every member trained its 20 segments
    starred = [r for r in rows if r.split()[0].endswith("*")]
    assert len(starred) == 1 and int(starred[0].split()[0][:-1]) == best["member"]
    assert f"best: member {best['member']} segment {best['segment']}" in out
    assert best["checkpoint"] in out
    lin = lines[lines.index("best lineage (the schedule that produced it):") + 2:]
    assert len(lin) == len(best["schedule"])
    for row, s in zip(lin, best["schedule"], strict=True):
        assert row.split()[:4] == [f"{s['steps_start']}-{s['steps_end']}", f"m{s['member']}", str(s["segment"]), s["kind"]]


def test_status_console_script_and_json(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = subprocess.run([sys.executable, "-m", "pbt_operator.cli", "status", str(run_dir), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    best = best_doc(run_dir)
    assert (doc["member"], doc["score"], doc["schedule"]) == (best["member"], best["score"], best["schedule"])
    assert len(doc["members"]) == 16 and doc["phase"] == "Succeeded"


def test_plot_png_html_and_series(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import matplotlib.image

    png = tmp_path / "q.png"
    rc, out, _ = pbt(capsys, "plot", str(run_dir), "--out", str(png), "--html")
    assert rc == 0, out
    img = matplotlib.image.imread(png)  # a valid PNG
    assert img.shape[0] > 300 and img.shape[1] > 600
    data = json.loads(png.with_suffix(".json").read_text())
    run = load_local(run_dir)
    assert data == json.loads(json.dumps(plot_data(run.spec, run.engine)))
    # one entry per member; a member's score line breaks exactly at its exploits
    assert [m["member"] for m in data["members"]] == list(range(16))
    exploits = {m: sum(1 for r in run.done if r.member == m and r.suggestion.kind == "exploit") for m in range(16)}
    assert sum(exploits.values()) > 0
    for m in data["members"]:
        assert len(m["jumps"]) == exploits[m["member"]]
        assert len(m["lines"]) == exploits[m["member"]] + 1
        assert sum(len(line) for line in m["lines"]) == 20 + exploits[m["member"]]  # + each jump's start
    # the figure draws exactly those series: lines, dashed jumps and x markers; one step line per parameter
    fig = figure(data)
    ax = fig.axes[0]
    n_lines = sum(len(m["lines"]) for m in data["members"])
    n_jumps = sum(len(m["jumps"]) for m in data["members"])
    assert len([ln for ln in ax.lines if ln.get_gid().startswith("member-")]) == n_lines + 2 * n_jumps
    assert [ln.get_gid() for ln in ax.lines if not ln.get_gid().startswith("member-")] == ["best-lineage"]
    assert len([ln for ln in ax.lines if ln.get_linestyle() == "--"]) == n_jumps
    assert [a.get_ylabel() for a in fig.axes[1:]] == ["h0", "h1"]
    best = best_doc(run_dir)
    for a, name in zip(fig.axes[1:], ["h0", "h1"], strict=True):
        (line,) = a.lines
        xs = list(line.get_xdata())
        assert xs == [s["steps_start"] for s in best["schedule"]] + [best["schedule"][-1]["steps_end"]]
        assert list(line.get_ydata())[:-1] == [s["hyperparameters"][name] for s in best["schedule"]]
    # the HTML page: self-contained, the same series
    page = png.with_suffix(".html").read_text()
    assert page.count('class="series"') == n_lines and page.count('class="jump"') == n_jumps
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert page == html(data)


def test_plot_default_path_is_the_run_folder(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "plot.png").unlink(missing_ok=True)
    rc, _, _ = pbt(capsys, "plot", str(copy))
    assert rc == 0 and (copy / "plot.png").stat().st_size > 10_000 and (copy / "plot.json").exists()


def test_export_json_yaml_match_the_lineage(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = pbt(capsys, "export", str(run_dir))
    assert rc == 0
    doc = json.loads(out)
    rc, out_yaml, _ = pbt(capsys, "export", str(run_dir), "--format", "yaml")
    assert rc == 0 and yaml.safe_load(out_yaml) == doc
    best = best_doc(run_dir)
    assert doc["checkpoint"] == best["checkpoint"] and doc["score"] == best["score"]
    assert doc["manifest"] == str(QUADRATIC)
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert [[s["member"], s["segment"]] for s in doc["schedule"]] == lineage["best"]
    run = load_local(run_dir)
    recs = chain(run.engine.records, (doc["member"], doc["segment"]))
    assert [dict(r.suggestion.hyperparameters) for r in recs] == [s["hyperparameters"] for s in doc["schedule"]]
    # consecutive: each entry starts where the previous one ended, and the last one is the best checkpoint
    assert all(a["steps_end"] == b["steps_start"] for a, b in zip(doc["schedule"], doc["schedule"][1:], strict=False))
    assert doc["schedule"][-1]["score"] == doc["score"]


def test_export_download_copies_a_restorable_checkpoint(run_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from pbt_worker.checkpoint import CheckpointReader
    from pbt_worker.storage import FileStorage

    dest = tmp_path / "best-ckpt"
    rc, _, err = pbt(capsys, "export", str(run_dir), "-o", str(tmp_path / "e.json"), "--download", str(dest))
    assert rc == 0, err
    doc = json.loads((tmp_path / "e.json").read_text())
    assert (dest / "_COMMITTED").exists() and "downloaded" in err
    src = CheckpointReader(FileStorage(), doc["checkpoint"])
    got = CheckpointReader(FileStorage(), dest.resolve().as_uri() + "/")
    assert got.names == src.names and got.get_object(got.main) == src.get_object(src.main)


def test_export_download_missing_checkpoint_fails_clearly(run_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    run = json.loads((copy / "run.json").read_text())
    run["storage"] = (tmp_path / "gone").as_uri()
    (copy / "run.json").write_text(json.dumps(run))
    rc, _, err = pbt(capsys, "export", str(copy), "--download", str(tmp_path / "d"))
    assert rc == 2 and "holds no committed checkpoint" in err


def test_export_download_from_s3(s3_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pbt_operator.local.runner import LocalRunner
    from pbt_operator.spec import Storage, load_manifest
    from pbt_worker.checkpoint import CheckpointReader
    from pbt_worker.storage import FileStorage, open_storage

    base = load_manifest(QUADRATIC)
    spec = dataclasses.replace(base, population=4, parallelism=2, budget=dataclasses.replace(base.budget, segments=3),
                               storage=Storage(uri=f"s3://{s3_env['PBT_TEST_BUCKET']}/runs"))
    out = tmp_path / "s3run"
    summary = LocalRunner(spec, out, plot=False).run()
    assert summary.engine.best is not None and not summary.engine.failed
    dest = tmp_path / "dl"
    rc, stdout, err = pbt(capsys, "export", str(out), "--manifest", str(QUADRATIC), "--download", str(dest))
    assert rc == 0, err
    doc = json.loads(stdout)
    assert doc["checkpoint"].startswith(f"s3://{s3_env['PBT_TEST_BUCKET']}/runs/quadratic/m")
    src = CheckpointReader(open_storage(doc["checkpoint"]), doc["checkpoint"])
    got = CheckpointReader(FileStorage(), dest.resolve().as_uri() + "/")
    assert got.get_object(got.main) == src.get_object(src.main)


def test_pbt_run_refuses_a_checkpoint_store_that_cannot_work(s3_env: dict[str, str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A bucket that does not exist is refused before the run folder exists, naming spec.storage.uri:
    every segment would fail alike, be retried and replaced, and the reason would sit in worker logs."""
    doc = yaml.safe_load(QUADRATIC.read_text())
    doc["spec"]["storage"] = {"uri": "s3://pbt-no-such-bucket-here/runs"}
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    shutil.copy(QUADRATIC.parent / "quadratic.py", tmp_path)
    shutil.copy(QUADRATIC.parent / "worker.py", tmp_path)
    out = tmp_path / "run"
    rc, _, err = pbt(capsys, "run", str(manifest), "--out", str(out), "--quiet", "--no-plot")
    assert rc == 2 and "spec.storage.uri" in err and "pbt-no-such-bucket-here" in err, err
    assert not out.exists()
    # the same manifest with a bucket that exists runs
    doc["spec"]["storage"] = {"uri": f"s3://{s3_env['PBT_TEST_BUCKET']}/runs"}
    doc["spec"]["budget"]["segments"] = 2
    manifest.write_text(yaml.safe_dump(doc))
    rc, _, err = pbt(capsys, "run", str(manifest), "--out", str(out), "--quiet", "--no-plot")
    assert rc == 0, err


def test_replay_reproduces_the_quadratic_exactly(run_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = pbt(capsys, "replay", str(run_dir), "--out", str(tmp_path / "r"), "--tolerance", "1e-12")
    assert rc == 0, out + err
    best = best_doc(run_dir)
    rep = json.loads((tmp_path / "r" / "replay.json").read_text())
    assert len(rep["steps"]) == len(best["schedule"])
    for st, s in zip(rep["steps"], best["schedule"], strict=True):
        assert (st["member"], st["segment"], st["steps_start"]) == (s["member"], s["segment"], s["steps_start"])
        assert st["score"] == pytest.approx(s["score"], abs=1e-12)
    assert f"population's: {best['score']:.4g}" in out
    # from an export file (YAML), with the manifest the export names
    exp = tmp_path / "best.yaml"
    assert pbt(capsys, "export", str(run_dir), "--format", "yaml", "-o", str(exp))[0] == 0
    rc, out, err = pbt(capsys, "replay", str(exp), "--out", str(tmp_path / "r2"), "--tolerance", "1e-12")
    assert rc == 0, out + err
    # an occupied output folder is refused unless --fresh
    rc, _, err = pbt(capsys, "replay", str(exp), "--out", str(tmp_path / "r2"))
    assert rc == 2 and "--fresh" in err


def test_replay_with_a_worker_that_cannot_start(run_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--manifest names a worker that cannot start here: the field and why, exit 2, no traceback."""
    doc = yaml.safe_load(QUADRATIC.read_text())
    doc["spec"]["worker"] = {"executor": "inline", "function": "no_such_module_xyz:segment"}
    man = tmp_path / "m.yaml"
    man.write_text(yaml.safe_dump(doc))
    rc, _, err = pbt(capsys, "replay", str(run_dir), "--manifest", str(man), "--out", str(tmp_path / "r"))
    assert rc == 2 and "spec.worker.function: cannot import module 'no_such_module_xyz'" in err, err


def test_replay_storage_option(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--storage puts the replay's checkpoints elsewhere: the inline worker must write them there, not
    through the file:// storage the population's own run used."""
    for uri in ("mem://replay/", (tmp_path / "store").as_uri() + "/"):
        out_dir = tmp_path / f"r{len(uri)}"
        rc, out, err = pbt(capsys, "replay", str(run_dir), "--out", str(out_dir), "--storage", uri, "--tolerance", "1e-12")
        assert rc == 0, out + err
        assert json.loads((out_dir / "replay.json").read_text())["checkpoint"].startswith(uri.rstrip("/"))
    assert (tmp_path / "store" / "quadratic-replay").is_dir()


def test_replay_tolerance_exceeded_exits_1(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(pbt(capsys, "export", str(run_dir))[1])
    doc["schedule"][-1]["score"] += 0.5  # pretend the population scored better than its schedule gives
    f = tmp_path / "e.json"
    f.write_text(json.dumps(doc))
    rc, _, err = pbt(capsys, "replay", str(f), "--out", str(tmp_path / "r"), "--tolerance", "0.01")
    assert rc == 1 and "differs from the population" in err


def test_old_run_folder_without_manifest(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "old"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "manifest.json"))
    run = load_local(copy)
    assert run.spec_inferred and run.spec.space.names == ["h0", "h1"] and run.spec.population == 16
    rc, out, _ = pbt(capsys, "status", str(copy))
    assert rc == 0 and "manifest unknown" in out and f"best: member {best_doc(run_dir)['member']}" in out
    assert pbt(capsys, "plot", str(copy))[0] == 0
    rc, _, err = pbt(capsys, "replay", str(copy), "--out", str(tmp_path / "r"))
    assert rc == 2 and "--manifest" in err
    rc, out, err = pbt(capsys, "replay", str(copy), "--manifest", str(QUADRATIC), "--out", str(tmp_path / "r"),
                       "--tolerance", "1e-12")
    assert rc == 0, err


def test_infer_spec_types() -> None:
    from pbt_operator.core.types import Record, Suggestion

    recs = [Record(Suggestion(m, 0, {"lr": lr, "bs": bs, "opt": opt}, None, 0, 5, "start"), 0.5, 5)
            for m, (lr, bs, opt) in enumerate([(1e-4, 8, "sgd"), (0.3, 64, "adam")])]
    spec = infer_spec("Some Name", recs, {"metric": "loss", "direction": "min"})
    assert spec.name == "some-name" and spec.objective.direction == "min"
    assert spec.space["lr"].log and spec.space["bs"].kind == "int" and spec.space["opt"].kind == "categorical"


def test_tensorboard_export_skips_cleanly_or_writes(run_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = pbt(capsys, "export", str(run_dir), "--tensorboard", str(tmp_path / "tb"))
    assert rc == 0 and json.loads(out)["member"] == best_doc(run_dir)["member"]
    try:
        import tensorboardX  # noqa: F401
        have = True
    except ImportError:
        try:
            import torch.utils.tensorboard  # noqa: F401
            have = True
        except ImportError:
            have = False
    if have:
        assert len(list((tmp_path / "tb").glob("member-*/events.out.tfevents.*"))) == 16
    else:
        assert "--tensorboard skipped" in err and not (tmp_path / "tb").exists()


def test_cluster_target_without_cluster_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.chdir(tmp_path)
    for cmd in ("status", "plot", "export"):
        rc, _, err = pbt(capsys, cmd, "no-such-run")
        assert rc == 2 and "not a run folder" in err, err
    assert os.getcwd() == str(tmp_path)


def test_cluster_objects_read_like_the_local_run(run_dir: Path) -> None:
    """The cluster reader is pure over the API's objects: member histories in finishedAt order rebuild
    the same best member and schedule as the local results file."""
    from pbt_operator.results_source import from_cluster_objects

    local = load_local(run_dir)
    doc = json.loads((run_dir / "manifest.json").read_text())["document"]
    training = {"metadata": {"name": "quadratic", "namespace": "ns1"},
                "spec": {**doc["spec"], "storage": {"uri": "s3://bucket/prefix"}},
                "status": {"phase": "Succeeded"}}
    members: dict[int, list[dict[str, Any]]] = {}
    for i, r in enumerate(local.records):
        members.setdefault(r.member, []).append({**r.to_dict(), "finishedAt": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z",
                                                 "job": f"quadratic-m{r.member:03d}-s{r.segment:05d}-a0"})
    objs = [{"metadata": {"name": f"quadratic-m{m:03d}"}, "spec": {"index": m},
             "status": {"phase": "Done", "history": hist}} for m, hist in sorted(members.items(), reverse=True)]
    run = from_cluster_objects(training, objs)
    assert run.source == "cluster:ns1/quadratic" and run.phase == "Succeeded"
    assert run.best is not None and local.best is not None and run.best.ref == local.best.ref
    exp = run.export_document()
    assert exp["schedule"] == local.schedule()
    assert exp["checkpoint"] == f"s3://bucket/prefix/quadratic/m{local.best.member:03d}/{local.best.segment:05d}/"
    assert {m.phase for m in run.members.values()} == {"Done"}
