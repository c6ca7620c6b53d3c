"""`pbt status | plot | export | replay` against a cluster: a real training run by the operator on the real
control plane, then the results commands run as a user would, with KUBECONFIG pointing at the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterlib import Cluster
from test_operator import OperatorProcess, crds, operator, training, wait_phase  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e

NAME = "quadres"
POPULATION, SEGMENTS = 4, 4


class Finished:
    def __init__(self, cluster: Cluster, namespace: str, obj: dict[str, Any], storage: Path):
        self.cluster = cluster
        self.namespace = namespace
        self.obj = obj
        self.storage = storage

    def pbt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(self.cluster.env, KUBECONFIG=self.cluster.kubeconfig)
        p = subprocess.run([sys.executable, "-m", "pbt_operator.cli", *args], env=env, capture_output=True,
                           text=True, timeout=180)
        if check:
            assert p.returncode == 0, f"pbt {' '.join(args)}: {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        return p


@pytest.fixture(scope="module")
def finished(cluster: Cluster, operator: OperatorProcess,  # noqa: F811
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    ns = f"results-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.wait_for(lambda: cluster.get("serviceaccount", "default", ns), 60, desc=f"default SA in {ns}")
    storage = tmp_path_factory.mktemp("results-ckpt")
    cluster.apply(training(NAME, storage, population=POPULATION, parallelism=4, segments=SEGMENTS), ns)
    obj = wait_phase(cluster, ns, NAME, operator)
    yield Finished(cluster, ns, obj, storage)
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_status_against_the_cluster(finished: Finished) -> None:
    st = finished.obj["status"]
    out = finished.pbt("status", NAME, "-n", finished.namespace).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"{NAME}  (cluster:{finished.namespace}/{NAME})  phase: Succeeded"), out
    assert any(ln.startswith("Succeeded: ") for ln in lines), out
    head = next(i for i, ln in enumerate(lines) if ln.split()[:6] == ["member", "seg", "steps", "score", "parent", "phase"])
    rows = lines[head + 1: head + 1 + POPULATION]
    assert [int(r.split()[0].rstrip("*")) for r in rows] == list(range(POPULATION))
    assert all(r.split()[1] == str(SEGMENTS - 1) and r.split()[5] == "Done" for r in rows), rows
    best = st["best"]
    assert f"best: member {best['member']} segment {best['segment']}" in out
    assert f"checkpoint: {best['checkpoint']}" in out
    lin = lines[lines.index("best lineage (the schedule that produced it):") + 2:]
    assert [r.split()[1:3] for r in lin] == [[f"m{s['member']}", str(s["segment"])] for s in st["schedule"]]
    doc = json.loads(finished.pbt("status", NAME, "-n", finished.namespace, "--json").stdout)
    assert doc["phase"] == "Succeeded" and len(doc["members"]) == POPULATION


def test_export_matches_the_status_lineage(finished: Finished, tmp_path: Path) -> None:
    from pbt_worker.checkpoint import CheckpointReader
    from pbt_worker.storage import FileStorage

    st = finished.obj["status"]
    doc = json.loads(finished.pbt("export", NAME, "-n", finished.namespace).stdout)
    assert doc["schedule"] == st["schedule"]
    assert doc["checkpoint"] == st["best"]["checkpoint"]
    assert (doc["member"], doc["segment"], doc["score"], doc["hyperparameters"]) == (
        st["best"]["member"], st["best"]["segment"], st["best"]["score"], st["best"]["hyperparameters"])
    assert doc["source"] == f"cluster:{finished.namespace}/{NAME}"
    as_yaml = finished.pbt("export", NAME, "-n", finished.namespace, "--format", "yaml").stdout
    assert yaml.safe_load(as_yaml) == doc
    dest = tmp_path / "best"
    p = finished.pbt("export", NAME, "-n", finished.namespace, "-o", str(tmp_path / "e.json"), "--download", str(dest))
    assert "downloaded" in p.stderr
    src = CheckpointReader(FileStorage(), doc["checkpoint"])
    got = CheckpointReader(FileStorage(), dest.resolve().as_uri() + "/")
    assert got.get_object(got.main) == src.get_object(src.main)


def test_plot_from_the_cluster(finished: Finished, tmp_path: Path) -> None:
    import matplotlib.image
    from pbt_operator.local.plots import figure

    st = finished.obj["status"]
    png = tmp_path / "quad.png"
    finished.pbt("plot", NAME, "-n", finished.namespace, "--out", str(png), "--html")
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 600
    data = json.loads(png.with_suffix(".json").read_text())
    assert [m["member"] for m in data["members"]] == list(range(POPULATION))
    members = finished.cluster.kubectl_json("get", "pbtm", "-n", finished.namespace,
                                            "-l", f"pbt.dev/training={NAME}")["items"]
    for mobj in members:
        idx = int(mobj["spec"]["index"])
        hist = [h for h in mobj["status"]["history"] if h["status"] == "done"]
        exploits = sum(1 for h in hist if h["suggestion"]["kind"] == "exploit")
        series = data["members"][idx]
        assert len(series["jumps"]) == exploits and len(series["lines"]) == exploits + 1
        assert sum(len(line) for line in series["lines"]) == len(hist) + exploits
    sched = st["schedule"]
    for p in data["schedule"]:
        assert [pt[0] for pt in p["points"]] == [s["steps_start"] for s in sched] + [sched[-1]["steps_end"]]
        assert [pt[1] for pt in p["points"][:-1]] == [s["hyperparameters"][p["name"]] for s in sched]
    fig = figure(data)
    n_lines = sum(len(m["lines"]) for m in data["members"])
    n_jumps = sum(len(m["jumps"]) for m in data["members"])
    assert len([ln for ln in fig.axes[0].lines if ln.get_gid().startswith("member-")]) == n_lines + 2 * n_jumps
    page = png.with_suffix(".html").read_text()
    assert page.count('class="series"') == n_lines and "<script src" not in page


def test_replay_of_the_cluster_schedule_reproduces_it(finished: Finished, tmp_path: Path) -> None:
    """Locally, with the training's own pod command (the e2e worker runs as a local process)."""
    st = finished.obj["status"]
    p = finished.pbt("replay", NAME, "-n", finished.namespace, "--out", str(tmp_path / "r"), "--tolerance", "1e-9")
    rep = json.loads((tmp_path / "r" / "replay.json").read_text())
    assert [(s["member"], s["segment"]) for s in rep["steps"]] == [(s["member"], s["segment"]) for s in st["schedule"]]
    assert rep["steps"][-1]["score"] == pytest.approx(st["best"]["score"], abs=1e-9)
    assert "population's" in p.stdout


def test_unknown_training_is_a_clear_error(finished: Finished) -> None:
    p = finished.pbt("status", "no-such-training", "-n", finished.namespace, check=False)
    assert p.returncode == 2 and "no PopulationTraining 'no-such-training'" in p.stderr, p.stderr
