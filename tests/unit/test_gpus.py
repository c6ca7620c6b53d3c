"""`pbt run`'s GPU slots (local/gpus.py): what a machine shows, what a template asks, how they are cut."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pbt_operator.local.gpus import GpuError, GpuSlots, parse_nvidia_smi, parse_visible, plan, requested


def template(gpus: object = None, *, kind: str = "limits", second: bool = False) -> dict[str, object]:
    trainer: dict[str, object] = {"name": "train", "image": "x"}
    if gpus is not None:
        trainer["resources"] = {kind: {"nvidia.com/gpu": gpus}}
    containers = [trainer]
    meta: dict[str, object] = {}
    if second:  # the trainer second, named by the default-container annotation
        containers = [{"name": "sidecar", "image": "y", "resources": {"limits": {"nvidia.com/gpu": 7}}}, trainer]
        meta = {"annotations": {"kubectl.kubernetes.io/default-container": "train"}}
    return {"metadata": meta, "spec": {"containers": containers}}


def test_cuda_visible_devices_as_cuda_reads_it() -> None:
    assert parse_visible("0,1, 3") == ["0", "1", "3"]
    assert parse_visible("") == []
    assert parse_visible("-1") == []
    assert parse_visible("2,-1,3") == ["2"]  # CUDA stops at the first invalid entry
    assert parse_visible("GPU-aa,MIG-bb") == ["GPU-aa", "MIG-bb"]
    assert parse_visible("0,garbage,1") == ["0"]  # a word is an invalid entry too: no device there
    assert parse_visible("garbage") == []


def test_nvidia_smi_listing_gives_uuids_and_mig_instances() -> None:
    listing = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-aaaa-bbbb-cccc-000000000000)\n"
        "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-22222222-aaaa-bbbb-cccc-000000000000)\n"
        "  MIG 3g.20gb     Device  0: (UUID: MIG-33333333-aaaa-bbbb-cccc-000000000000)\n"
        "  MIG 3g.20gb     Device  1: (UUID: MIG-44444444-aaaa-bbbb-cccc-000000000000)\n"
        "GPU 2: NVIDIA L4 (UUID: GPU-55555555-aaaa-bbbb-cccc-000000000000)\n"
    )
    assert parse_nvidia_smi(listing) == [
        "GPU-11111111-aaaa-bbbb-cccc-000000000000",
        "MIG-33333333-aaaa-bbbb-cccc-000000000000",  # GPU 1 runs CUDA only on its instances
        "MIG-44444444-aaaa-bbbb-cccc-000000000000",
        "GPU-55555555-aaaa-bbbb-cccc-000000000000",
    ]
    assert parse_nvidia_smi("No devices were found\n") == []


def test_the_template_request_is_the_trainers() -> None:
    assert requested(None, 0) == (0, "")
    assert requested(template(), 0) == (0, "")
    assert requested(template(2), 0) == (2, "spec.template.spec.containers[0].resources.limits['nvidia.com/gpu']")
    assert requested(template("1", kind="requests"), 0)[0] == 1
    assert requested(template(1, second=True), 1)[0] == 1  # not the sidecar's 7
    with pytest.raises(GpuError, match=r"containers\[0\]\.resources\.limits\['nvidia.com/gpu'\]: must be a whole"):
        requested(template("one"), 0)


def test_slots_are_cut_from_the_devices() -> None:
    p, note = plan(template(1), 0, gpus="0,1,2", per_member=None, environ={})
    assert p is not None and p.slots == ("0", "1", "2") and p.per_member == 1
    assert note is not None and "3 slots from --gpus" in note
    p, note = plan(template(2), 0, gpus="0,1,2,3,4", per_member=None, environ={})
    assert p is not None and p.slots == ("0,1", "2,3")  # the fifth GPU fits no slot
    # and the note says so: a GPU that no member ever gets was left out without a word
    assert note == ("each running member gets its own 2 GPUs (2 slots from --gpus: 0,1, 2,3; 4 left unused "
                    "(5 GPUs, 2 per slot))")
    p, _ = plan(template(1), 0, gpus=None, per_member=2, environ={"CUDA_VISIBLE_DEVICES": "4,5"})
    assert p is not None and p.slots == ("4,5",) and p.source == "CUDA_VISIBLE_DEVICES"


def test_nothing_is_assigned_without_a_request_or_with_none() -> None:
    assert plan(template(), 0, gpus=None, per_member=None, environ={"CUDA_VISIBLE_DEVICES": "0,1"}) == (None, None)
    assert plan(template(1), 0, gpus="none", per_member=None, environ={}) == (None, None)
    assert plan(template(1), 0, gpus="0,1", per_member=0, environ={}) == (None, None)


def test_a_request_on_a_machine_without_gpus_is_a_note() -> None:
    p, note = plan(template(1), 0, gpus=None, per_member=None, environ={"PATH": "/nonexistent"})
    assert p is None
    assert note is not None and "asks for 1 nvidia.com/gpu per member" in note and "nvidia-smi not found" in note
    p, note = plan(template(1), 0, gpus=None, per_member=None, environ={"CUDA_VISIBLE_DEVICES": "-1"})
    assert p is None and note is not None and "shows no GPU (CUDA_VISIBLE_DEVICES)" in note


def test_impossible_settings_name_the_field() -> None:
    with pytest.raises(GpuError, match=r"containers\[0\].*: 3 GPUs per member, but --gpus shows 2 .*--gpus-per-member 2"):
        plan(template(3), 0, gpus="0,1", per_member=None, environ={})
    with pytest.raises(GpuError, match="--gpus: lists no device"):
        plan(template(1), 0, gpus=",", per_member=None, environ={})
    with pytest.raises(GpuError, match="names a device twice"):
        plan(template(1), 0, gpus="0,0", per_member=None, environ={})
    # a word is no device: CUDA would stop at it and every member would run without a GPU, unsaid
    with pytest.raises(GpuError, match=r"--gpus: 'garbage' names no device"):
        plan(template(1), 0, gpus="garbage", per_member=None, environ={})
    with pytest.raises(GpuError, match=r"--gpus: 'gpu1' names no device"):
        plan(template(1), 0, gpus="0,gpu1", per_member=None, environ={})


def test_slots_are_held_until_given_back() -> None:
    slots = GpuSlots(["0", "1"])
    assert slots.take() == "0" and slots.take() == "1"
    with pytest.raises(TimeoutError):
        slots.take(timeout=0.05)
    threading.Timer(0.1, slots.give, args=("1",)).start()
    t0 = time.monotonic()
    assert slots.take(timeout=5) == "1" and time.monotonic() - t0 >= 0.05
    slots.give("1")
    slots.give("0")
    assert slots.take() == "0"  # the lowest free slot first


def test_gpus_given_without_a_request_means_one_each() -> None:
    p, _ = plan(template(), 0, gpus="0,1", per_member=None, environ={})
    assert p is not None and p.slots == ("0", "1")
    p, _ = plan(None, 0, gpus="all", per_member=None, environ={"CUDA_VISIBLE_DEVICES": "3"})
    assert p is not None and p.slots == ("3",)


def test_a_failing_nvidia_smi_says_why(tmp_path: Path) -> None:
    """'nvidia-smi -L exited with 9' alone left the user to run it again to learn why (no driver, say)."""
    from pbt_operator.local.gpus import detect

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                   "driver.\" >&2\nexit 9\n")
    smi.chmod(0o755)
    devices, source = detect({"PATH": str(tmp_path)})
    assert devices == [] and source == ("nvidia-smi -L exited with 9: NVIDIA-SMI has failed because it couldn't "
                                        "communicate with the NVIDIA driver.")


def test_a_hung_nvidia_smi_is_waited_for_a_while(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It said "nvidia-smi -L failed: Command '['/usr/bin/nvidia-smi', '-L']' timed out after 20 seconds"."""
    from pbt_operator.local import gpus

    monkeypatch.setattr(gpus, "SMI_TIMEOUT", 0.5)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexec sleep 30\n")
    smi.chmod(0o755)
    t0 = time.monotonic()
    assert gpus.detect({"PATH": str(tmp_path)}) == ([], "nvidia-smi -L did not answer in 0.5 s")
    assert time.monotonic() - t0 < 10
