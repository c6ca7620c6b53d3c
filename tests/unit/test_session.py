"""The pure parts of `pbt_operator.run` (local/session.py): how a Python function stands in the manifest
and in the fingerprint, the settings' bounds, the lazy import, and the checkpoint read it shares with
`seg.restore()`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pbt_operator.local.runner import RunError, run_fingerprints
from pbt_operator.local.session import _check_int, _function_id, _function_ref, _with_function, python_terms


def module_level(seg: Any) -> float:
    return 0.0


def closure() -> Any:
    def segment(seg: Any) -> float:
        return 1.0

    return segment


def test_a_function_in_the_manifest_and_in_the_fingerprint() -> None:
    assert _function_ref(module_level) == f"{__name__}:module_level"
    assert _function_id(module_level) == f"{__name__}:module_level"
    # a closure: the field takes its name; the fingerprint its qualified name
    assert _function_ref(closure()) == f"{__name__}:segment"
    assert _function_id(closure()) == f"{__name__}:closure.<locals>.segment"
    # a lambda's name is no identifier: a stand-in the field accepts
    assert _function_ref(lambda seg: 0.0) == f"{__name__}:function"

    class Callable:
        def __call__(self, seg: Any) -> float:
            return 0.0

    assert _function_ref(Callable()) == f"{__name__}:function"


def test_the_function_replaces_the_worker_but_keeps_its_env() -> None:
    doc = {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": "t"},
           "spec": {"population": 2, "worker": {"executor": "process", "command": ["python", "t.py"],
                                                "env": {"AWS_ENDPOINT_URL": "http://x"}, "workingDir": "sub",
                                                "warm": False}}}
    out = _with_function(doc, module_level, "m:f")
    assert out["spec"]["worker"] == {"env": {"AWS_ENDPOINT_URL": "http://x"}, "workingDir": "sub",
                                     "executor": "inline", "function": "m:f", "pool": "threads"}
    assert doc["spec"]["worker"]["executor"] == "process"  # the caller's dict is left alone
    assert _with_function({"spec": {"population": 2}}, module_level, "m:f")["spec"]["worker"] == {
        "executor": "inline", "function": "m:f", "pool": "threads"}
    assert _with_function({"spec": "nonsense"}, module_level, "m:f") == {"spec": "nonsense"}  # the parser says why
    # --resume tells functions apart by module and qualified name
    fp = run_fingerprints(_with_function(doc, module_level, _function_id(module_level)), {})
    assert fp != run_fingerprints(_with_function(doc, closure(), _function_id(closure())), {})
    assert fp == run_fingerprints(_with_function(doc, module_level, _function_id(module_level)), {})


def test_settings_have_the_flags_bounds() -> None:
    _check_int("seed", None, 0)
    _check_int("seed", 0, 0)
    with pytest.raises(RunError, match=r"^seed: must be >= 0 \(got -1\)$"):
        _check_int("seed", -1, 0)
    with pytest.raises(RunError, match=r"^parallelism: must be an integer \(got '2'\)$"):
        _check_int("parallelism", "2", 1)  # type: ignore[arg-type]
    with pytest.raises(RunError, match="must be an integer"):
        _check_int("parallelism", True, 1)


def test_import_pbt_operator_stays_light() -> None:
    code = ("import sys, pbt_operator\n"
            "heavy = [m for m in ('numpy', 'yaml', 'pbt_operator.local.session', 'pbt_operator.local.runner') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert pbt_operator.run.__module__ == 'pbt_operator.local.session'\n"
            "assert pbt_operator.RunError.__module__ == 'pbt_operator.local.runner'\n"
            "assert pbt_operator.RunResult.__name__ == 'RunResult'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import pbt_operator

    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pbt_operator.nothing  # noqa: B018


def test_checkpoint_value_reads_what_save_stored(tmp_path: Path) -> None:
    """CheckpointReader.value: the one read `seg.restore()` and `RunResult.load_best()` share."""
    from pbt_worker.checkpoint import CheckpointReader, CheckpointWriter
    from pbt_worker.storage import FileStorage

    storage = FileStorage(fsync=False)
    obj_uri = (tmp_path / "obj").as_uri() + "/"
    w = CheckpointWriter(storage, obj_uri)
    w.put_object("state", {"w": [1, 2]})
    w.commit(main="state", kind="object")
    called: list[bool] = []

    def scratch() -> Path:
        called.append(True)
        return tmp_path / "scratch"

    reader = CheckpointReader(storage, obj_uri)
    assert reader.main == "state"
    assert reader.value(scratch) == {"w": [1, 2]} and not called  # no folder for an object
    src = tmp_path / "model.txt"
    src.write_text("weights")
    file_uri = (tmp_path / "file").as_uri() + "/"
    w = CheckpointWriter(storage, file_uri)
    w.put_file("model.txt", src)
    w.commit(main="model.txt", kind="file")
    (tmp_path / "scratch").mkdir()
    got = CheckpointReader(storage, file_uri).value(scratch)
    assert got == tmp_path / "scratch" / "model.txt" and got.read_text() == "weights" and called


def test_the_runners_messages_in_run_s_terms() -> None:
    """`pbt run`'s messages name its flags; a Python caller passes arguments (`pass --resume` told a
    notebook user about a flag it has no way to give)."""
    assert (python_terms("/r already holds a run: pass --resume to continue it, or --fresh to start over")
            == "/r already holds a run: pass resume=True to continue it, or fresh=True to start over")
    assert python_terms("--resume: /r holds the run 'a', this run is named 'b': pass --name a").endswith(
        "pass name='a'")
    assert python_terms("the manifest (or --seed) changed") == "the manifest (or seed) changed"
    assert (python_terms("--gpus-per-member: 3 GPUs per member, but --gpus shows 2 (0, 1): lower it with "
                         "--gpus-per-member 2, or run where 3 are visible")
            == "gpus_per_member: 3 GPUs per member, but gpus shows 2 (0, 1): lower it with gpus_per_member=2, "
               "or run where 3 are visible")
    assert (python_terms("--gpus: lists no device (got ','; e.g. --gpus 0,1, --gpus all or --gpus none)")
            == "gpus: lists no device (got ','; e.g. gpus='0,1', gpus='all' or gpus='none')")
    assert python_terms("spec.population: must be >= 2 (got 1)") == "spec.population: must be >= 2 (got 1)"


def test_a_mem_checkpoint_gone_with_its_process_says_so() -> None:
    """RunResult.open(...).load_best() in a later session of a mem:// run: the storage was that process's
    memory; the bare 'no committed checkpoint ... killed mid-save, or already deleted' sent users looking
    for a crash."""
    from pbt_operator.local.session import load_checkpoint
    from pbt_operator.spec import parse_manifest

    spec = parse_manifest({"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": "t"},
                           "spec": {"population": 2, "hyperparameters": {"lr": {"type": "float", "min": 0.1, "max": 1}},
                                    "storage": {"uri": "mem://gone"},
                                    "worker": {"executor": "inline", "function": "m:f"}}})
    with pytest.raises(RunError, match=r"mem:// checkpoints live only in the Python process that ran the training"):
        load_checkpoint("mem://gone/t/m000/00000/", spec)
