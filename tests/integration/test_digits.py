"""The digits example end to end: `pbt run` starts real subprocesses running examples/digits/train.py
(torch on the CPU), once with file:// checkpoints and once against a real S3-compatible server.

The worker reports a fingerprint of the weights it restored and of the weights it saved. An exploit
must restore exactly the weights its donor saved: a PBT that copied only hyperparameters (and kept
its own weights) fails this test.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.torch, pytest.mark.slow]


def small_manifest(tmp_path: Path, storage: str | None = None) -> Path:
    """The example's manifest, smaller: 4 members x 4 segments of 20 steps, so a CI run stays short."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "digits" / "populationtraining.yaml").read_text())
    spec = doc["spec"]
    spec.update(population=4, parallelism=2)
    spec["segment"]["steps"] = 20
    spec["budget"]["segments"] = 4
    spec["exploit"] = {"strategy": "truncation", "fraction": 0.5}
    spec["worker"]["command"] = [sys.executable, str(ROOT / "examples" / "digits" / "train.py")]
    spec["worker"]["env"] = {"PBT_CPU": "1"}
    if storage:
        spec["storage"] = {"uri": storage}
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(manifest: Path, out: Path, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    p = subprocess.run([sys.executable, "-m", "pbt_operator.cli", "run", str(manifest), "--out", str(out),
                        "--quiet"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def check_exploits_restore_donor_weights(records: list[dict[str, Any]]) -> int:
    done = {(r["suggestion"]["member"], r["suggestion"]["segment"]): r for r in records if r["status"] == "done"}
    exploits = [r for r in done.values() if r["suggestion"]["kind"] == "exploit"]
    assert exploits, "no exploit happened"
    for r in exploits:
        s = r["suggestion"]
        donor_rec = done[tuple(s["restore"])]
        assert s["restore"][0] == s["donor"] != s["member"]
        restored = r["metrics"]["restored_weights"]
        assert restored == donor_rec["metrics"]["saved_weights"], (s, restored)
        own_prev = done.get((s["member"], s["segment"] - 1))
        if own_prev is not None and own_prev["metrics"]["saved_weights"] != donor_rec["metrics"]["saved_weights"]:
            assert restored != own_prev["metrics"]["saved_weights"]
    for r in done.values():  # and a plain continue restores the member's own weights
        s = r["suggestion"]
        if s["kind"] == "continue":
            assert r["metrics"]["restored_weights"] == done[tuple(s["restore"])]["metrics"]["saved_weights"]
    return len(exploits)


def test_digits_file_storage(tmp_path: Path) -> None:
    out = tmp_path / "run"
    records = run(small_manifest(tmp_path), out)
    assert len([r for r in records if r["status"] == "done"]) == 16
    assert check_exploits_restore_donor_weights(records) >= 1
    best = json.loads((out / "best.json").read_text())
    assert 0.0 < best["score"] <= 1.0 and best["checkpoint"].startswith("file://")
    assert (Path(best["checkpoint"][len("file://"):]) / "_COMMITTED").exists()
    sched = best["schedule"]
    assert sched[0]["steps_start"] == 0 and sched[-1]["score"] == best["score"]
    assert all(a["steps_end"] == b["steps_start"] for a, b in itertools.pairwise(sched))  # one unbroken training
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lineage = json.loads((out / "lineage.json").read_text())
    assert len(lineage["nodes"]) == 16


def test_digits_s3_storage(tmp_path: Path, s3_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    records = run(small_manifest(tmp_path, s3_env["PBT_TEST_BASE"] + "digits"), out, s3_env)
    assert check_exploits_restore_donor_weights(records) >= 1
    best = json.loads((out / "best.json").read_text())
    assert best["checkpoint"].startswith(s3_env["PBT_TEST_BASE"])
    key = best["checkpoint"][len(f"s3://{s3_env['PBT_TEST_BUCKET']}/"):] + "_COMMITTED"
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"], region_name=s3_env["AWS_REGION"],
                      aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"])
    s3.head_object(Bucket=s3_env["PBT_TEST_BUCKET"], Key=key)  # the best checkpoint is committed in S3
