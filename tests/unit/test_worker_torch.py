"""torch checkpoints through file:// and mem:// (CPU only)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pbt_worker import Segment, mem_storage

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def make(base: str, k: int) -> Segment:
    return Segment({"version": 1, "training": "t", "member": 0, "segment": k, "hyperparameters": {},
                    "steps": {"start": 0, "budget": 1}, "restore": f"{base}{k - 1}/" if k else None,
                    "checkpoint": f"{base}{k}/", "result": None, "gc": []})


def _state() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 3}


def test_state_dict_round_trip_file(tmp_path: Path) -> None:
    base = f"file://{tmp_path}/"
    state = _state()
    make(base, 0).save(state)
    reader = make(base, 1).restored()
    assert reader is not None and reader.entry("state").encoding == "torch"
    back = make(base, 1).restore()
    assert back["epoch"] == 3
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v) and back["model"][k].device.type == "cpu"
    assert back["opt"]["param_groups"][0]["lr"] == 1e-3


def test_tensor_and_module(tmp_path: Path) -> None:
    base = f"file://{tmp_path}/"
    make(base, 0).save(torch.arange(5))
    assert torch.equal(make(base, 1).restore(), torch.arange(5))
    module = torch.nn.Linear(2, 2)
    make(f"{base}m/", 0).save(module)
    assert isinstance(make(f"{base}m/", 1).restore(), torch.nn.Linear)  # falls back to the full unpickler
    with pytest.raises(pickle.UnpicklingError):
        make(f"{base}m/", 1).restore(weights_only=True)


def test_force_torch_encoding_and_map_location(tmp_path: Path) -> None:
    base = f"file://{tmp_path}/"
    make(base, 0).save({"plain": [1, 2]}, encoding="torch")
    assert make(base, 1).restore(map_location="cpu") == {"plain": [1, 2]}


def test_mem_keeps_a_private_copy() -> None:
    mem_storage().clear()
    base = "mem://torch/"
    w = torch.zeros(3)
    make(base, 0).save({"w": w})
    w += 1  # in-place update after save must not reach the checkpoint
    back = make(base, 1).restore()
    assert torch.equal(back["w"], torch.zeros(3))
    back["w"] += 5
    assert torch.equal(make(base, 1).restore()["w"], torch.zeros(3))


def test_torch_is_not_imported_for_plain_objects(tmp_path: Path) -> None:
    code = (
        "import sys; from pbt_worker import Segment\n"
        f"base = 'file://{tmp_path}/p/'\n"
        "c = {'version': 1, 'training': 't', 'member': 0, 'segment': 0, 'hyperparameters': {},"
        " 'steps': {'start': 0, 'budget': 1}, 'restore': None, 'checkpoint': base + '0/', 'result': None,"
        " 'gc': []}\n"
        "Segment(c).save({'a': 1})\n"
        "c.update(segment=1, restore=base + '0/', checkpoint=base + '1/')\n"
        "assert Segment(c).restore() == {'a': 1}\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_full_disk_during_torch_save_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save turns the OSError of a full spool disk into "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos": the error must still say what happened and where."""
    import errno

    from pbt_worker import PermanentStorageError
    from pbt_worker.storage import base as storage_base

    real = storage_base.HashingWriter.write

    def fill_up(self: Any, data: Any) -> int:
        if self.size > 4096:
            self._raw = _Full()  # the underlying file fails from now on
        return real(self, data)

    class _Full:
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_base.HashingWriter, "write", fill_up)
    seg = Segment({"version": 1, "training": "t", "member": 0, "segment": 0, "hyperparameters": {},
                   "steps": {"start": 0, "budget": 1}, "restore": None,
                   "checkpoint": f"file://{tmp_path}/t/m000/00000/", "gc": []})
    with pytest.raises(PermanentStorageError, match="No space left on device"):
        seg.save({"w": torch.ones(1_000_000)})
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


class Slotted:
    __slots__ = ("w",)

    def __init__(self, w: Any) -> None:
        self.w = w


def test_tensors_anywhere_in_the_state_choose_the_torch_encoding() -> None:
    """Deep nesting, late list items, objects, sets and cycles: any tensor routes the state through torch
    (plain pickle would keep each tensor's device, so map_location could not move it)."""
    from dataclasses import dataclass

    from pbt_worker.checkpoint import choose_encoding, looks_like_torch

    t = torch.zeros(2)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    assert choose_encoding({"opt": {"adam": opt.state_dict()}}) == "torch"  # a tensor 5 levels down
    deep: Any = t
    for _ in range(50):
        deep = {"x": [deep]}
    assert choose_encoding(deep) == "torch"
    assert choose_encoding([0] * 1000 + [t]) == "torch"
    assert choose_encoding({"s": frozenset([("k", t)])}) == "torch"

    @dataclass
    class TrainState:
        weights: Any
        step: int

    assert choose_encoding({"state": TrainState(weights=t, step=3)}) == "torch"
    cyclic: dict[str, Any] = {"n": 1}
    cyclic["self"] = cyclic
    assert choose_encoding(cyclic) == "pickle"
    cyclic["t"] = t
    assert choose_encoding(cyclic) == "torch"
    assert choose_encoding({"a": [list(range(100)) for _ in range(2000)], "b": TrainState(1, 2)}) == "pickle"

    assert choose_encoding([Slotted(t)]) == "torch"  # the walk cannot see into it: a trial pickling
    assert choose_encoding([Slotted(1)]) == "pickle"
    assert looks_like_torch([[i] for i in range(50)] + [{"t": t}], limit=10)  # past the bound: pickled
    assert not looks_like_torch([[i] for i in range(50)], limit=10)


def test_numpy_parts_of_a_state_cost_no_trial_pickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy scalars are leaves of the walk, and a trial pickling (an opaque object beside large arrays)
    does not serialise the arrays' data: a state of numpy weights and a step counter stays cheap."""
    import numpy as np
    from pbt_worker import checkpoint

    trials: list[Any] = []
    real = checkpoint._pickle_meets
    monkeypatch.setattr(checkpoint, "_pickle_meets", lambda obj, types: trials.append(obj) or real(obj, types))
    assert not checkpoint.looks_like_torch({"step": np.int64(3), "loss": np.float32(0.5), "w": np.zeros(4)})
    assert trials == []

    written: list[int] = []

    class Counting(checkpoint._Discard):
        def write(self, data: Any) -> int:
            written.append(len(data))
            return len(data)

    monkeypatch.setattr(checkpoint, "_Discard", Counting)
    state = {"w": np.zeros(1_000_000), "opaque": Slotted(1)}
    assert not checkpoint.looks_like_torch(state)
    assert len(trials) == 1 and sum(written) < 10_000  # the 8 MB array was not written to the sink
    assert checkpoint.looks_like_torch({"w": np.zeros(10), "opaque": Slotted(torch.zeros(1))})


def test_a_deeply_nested_tensor_honours_map_location(tmp_path: Path) -> None:
    base = f"file://{tmp_path}/"
    state = {"opt": {"adam": {"state": {0: {"exp_avg": torch.ones(3)}}}}, "later": [0] * 100 + [torch.ones(1)]}
    make(base, 0).save(state)
    reader = make(base, 1).restored()
    assert reader is not None and reader.entry("state").encoding == "torch"
    seen: list[str] = []

    def locate(storage: Any, location: str) -> Any:
        seen.append(location)
        return storage

    back = make(base, 1).restore(map_location=locate)
    assert seen and set(seen) == {"cpu"}  # map_location was asked about every storage
    assert torch.equal(back["opt"]["adam"]["state"][0]["exp_avg"], torch.ones(3))
    assert torch.equal(back["later"][100], torch.ones(1))
