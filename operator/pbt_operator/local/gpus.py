"""Which GPUs `pbt run` hands to each running segment.

On a cluster a segment's pod gets the GPUs its template requests from the device plugin. Here every
member shares one machine, and a CUDA program sees every GPU and starts on the first: four members on a
four-GPU workstation would all train on GPU 0 and leave three idle (or run out of its memory). So the
GPUs are cut into slots of the template's request, each running segment gets one slot through
`CUDA_VISIBLE_DEVICES`, and no more segments run at once than there are slots.

Devices are named as `CUDA_VISIBLE_DEVICES` names them: the entries of the caller's own
`CUDA_VISIBLE_DEVICES` when it is set (so `CUDA_VISIBLE_DEVICES=2,3 pbt run` uses GPUs 2 and 3), else
the UUIDs `nvidia-smi -L` lists (UUIDs, not indexes: CUDA numbers devices fastest-first by default,
nvidia-smi by PCI bus, and MIG instances can only be named by UUID).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.display import counted, shorten

GPU_RESOURCE = "nvidia.com/gpu"
ENV = "CUDA_VISIBLE_DEVICES"
SMI_TIMEOUT = 20.0  # seconds `pbt run` waits for `nvidia-smi -L`


class GpuError(ValueError):
    """A GPU setting `pbt run` cannot honour; the message names the field or flag."""


@dataclass(frozen=True)
class GpuPlan:
    """`slots`: one `CUDA_VISIBLE_DEVICES` value per segment that may run at once."""

    slots: tuple[str, ...]
    per_member: int
    source: str
    unused: tuple[str, ...] = ()  # devices that fill no slot (their count is no multiple of per_member)

    def describe(self) -> str:
        each = "its own GPU" if self.per_member == 1 else f"its own {self.per_member} GPUs"
        left = (f"; {', '.join(_short(d) for d in self.unused)} left unused "
                f"({len(self.unused) + self.per_member * len(self.slots)} GPUs, {self.per_member} per slot)"
                if self.unused else "")
        return (f"each running member gets {each} ({counted(len(self.slots), 'slot')} from {self.source}: "
                f"{self.shown()}{left})")

    def shown(self) -> str:
        """The slots as every note shows them: 'GPU-8f1c2a3b, GPU-0d9e7f61' (a UUID cut to its first 8 hex
        digits), '0,1, 2,3'."""
        return ", ".join(_short(s) for s in self.slots)


def _short(slot: str) -> str:
    return ",".join(d[:12] if d.startswith(("GPU-", "MIG-")) else d for d in slot.split(","))


def requested(template: Mapping[str, Any] | None, trainer: int) -> tuple[int, str]:
    """GPUs the trainer container of `template` asks for, and the field that says so. Kubernetes
    takes an extended resource from `limits` (and requires `requests`, if given, to equal it)."""
    containers = ((template or {}).get("spec") or {}).get("containers") or []
    if not containers or trainer >= len(containers):
        return 0, ""
    resources = containers[trainer].get("resources") or {}
    for kind in ("limits", "requests"):
        value = (resources.get(kind) or {}).get(GPU_RESOURCE)
        if value is None:
            continue
        field = f"spec.template.spec.containers[{trainer}].resources.{kind}['{GPU_RESOURCE}']"
        try:
            n = int(str(value))
        except ValueError:
            raise GpuError(f"{field}: must be a whole number of GPUs (got {value!r})") from None
        if n < 0:
            raise GpuError(f"{field}: must be >= 0 (got {n})")
        return n, field
    return 0, ""


# What CUDA_VISIBLE_DEVICES accepts as a device: an index, or a GPU's or MIG instance's UUID (or its
# unique prefix).
_DEVICE = re.compile(r"\d+|(?:GPU|MIG)-[\w./-]+")


def parse_visible(value: str) -> list[str]:
    """The devices a `CUDA_VISIBLE_DEVICES` value lists. CUDA stops at the first invalid entry, so a
    negative index (`-1`, the usual "no GPU") or a word that names no device (`garbage`) ends the list."""
    out = []
    for entry in value.split(","):
        entry = entry.strip()
        if not _DEVICE.fullmatch(entry):
            break
        out.append(entry)
    return out


def parse_nvidia_smi(listing: str) -> list[str]:
    """Device UUIDs from `nvidia-smi -L`: each GPU's, or, for a GPU in MIG mode, its MIG instances'
    (CUDA runs on the instances, not on the GPU that holds them)."""
    devices: list[str] = []
    gpu: str | None = None
    migs: list[str] = []
    for line in listing.splitlines():
        found = re.search(r"\(UUID:\s*((?:GPU|MIG)-[^)\s]+)\)", line)
        if not found:
            continue
        uuid = found.group(1)
        if line.lstrip().startswith("GPU ") and uuid.startswith("GPU-"):
            if gpu is not None:
                devices += migs or [gpu]
            gpu, migs = uuid, []
        elif uuid.startswith("MIG-"):
            migs.append(uuid)
    if gpu is not None:
        devices += migs or [gpu]
    return devices


def detect(environ: Mapping[str, str]) -> tuple[list[str], str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES would name them, and where that came from."""
    if ENV in environ:
        return parse_visible(environ[ENV]), ENV
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=SMI_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:  # a hung driver: the run goes on without GPU slots
        return [], f"nvidia-smi -L did not answer in {SMI_TIMEOUT:g} s"
    except OSError as e:
        return [], f"nvidia-smi -L failed: {e}"
    if out.returncode != 0:  # its first line says why (no driver, a driver/library mismatch)
        why = next((line.strip() for line in (out.stderr or out.stdout or "").splitlines() if line.strip()), "")
        return [], f"nvidia-smi -L exited with {out.returncode}" + (f": {shorten(why, 200)}" if why else "")
    return parse_nvidia_smi(out.stdout), "nvidia-smi -L"


def plan(template: Mapping[str, Any] | None, trainer: int, *, gpus: str | None, per_member: int | None,
         environ: Mapping[str, str]) -> tuple[GpuPlan | None, str | None]:
    """The slots for a run, or None to leave CUDA_VISIBLE_DEVICES alone, and a note for the user.

    `gpus` is `--gpus`: None or "all" (what this machine shows), "none", or a comma-separated list
    of devices; `per_member` is `--gpus-per-member`, which overrides the template's request (none
    and no `--gpus-per-member`, but `--gpus` given: one GPU per member)."""
    if gpus is not None and gpus.strip().lower() == "none":
        return None, None
    if per_member is None:
        per_member, field = requested(template, trainer)
        if per_member == 0 and gpus is not None:  # --gpus asked for slots: one GPU each unless told otherwise
            per_member, field = 1, "--gpus"
    else:
        field = "--gpus-per-member"
    if per_member == 0:
        return None, None
    if gpus is None or gpus.strip().lower() == "all":
        devices, source = detect(environ)
    else:
        devices, source = parse_visible(gpus), "--gpus"
        entries = [e.strip() for e in gpus.split(",")]
        bad = next((e for e in entries if e and not _DEVICE.fullmatch(e)), None)
        if bad is not None:  # CUDA would stop there: every member would run without a GPU, silently
            raise GpuError(f"--gpus: {bad!r} names no device (got {gpus!r}; devices are indexes or GPU-/MIG- "
                           "UUIDs as CUDA_VISIBLE_DEVICES takes them: e.g. --gpus 0,1, --gpus all or --gpus none)")
        if not devices:
            raise GpuError(f"--gpus: lists no device (got {gpus!r}; e.g. --gpus 0,1, --gpus all or --gpus none)")
    if len(set(devices)) != len(devices):
        raise GpuError(f"{source}: names a device twice ({','.join(devices)})")
    if not devices:
        asks = f"{field} asks for {per_member} {GPU_RESOURCE} per member"
        return None, (f"{asks}, and this machine shows no GPU ({source}): the members run without one "
                      f"(--gpus-per-member 0 says so without this note)")
    if per_member > len(devices):
        raise GpuError(f"{field}: {per_member} GPUs per member, but {source} shows {len(devices)} "
                       f"({', '.join(_short(d) for d in devices)}): lower it with --gpus-per-member "
                       f"{len(devices)}, or run where {per_member} are visible")
    slots = tuple(",".join(devices[i:i + per_member]) for i in range(0, len(devices) - per_member + 1, per_member))
    p = GpuPlan(slots, per_member, source, tuple(devices[len(slots) * per_member:]))
    return p, p.describe()


class GpuSlots:
    """The free slots while a run lasts: a segment (or a warm worker) holds one until its process has
    exited, so no two processes ever share a slot. Lowest slot first, so runs place alike."""

    def __init__(self, slots: Sequence[str]):
        self.order = {s: i for i, s in enumerate(slots)}
        self.free = list(slots)
        self.cond = threading.Condition()

    def take(self, timeout: float | None = None) -> str:
        """A free slot; waits for one (a worker that is exiting gives its slot back when it is gone).
        TimeoutError if none frees up in `timeout` seconds."""
        with self.cond:
            if not self.cond.wait_for(lambda: bool(self.free), timeout=timeout):
                raise TimeoutError("no GPU slot became free")
            self.free.sort(key=self.order.__getitem__)
            return self.free.pop(0)

    def give(self, slot: str) -> None:
        with self.cond:
            if slot not in self.free:
                self.free.append(slot)
            self.cond.notify()
