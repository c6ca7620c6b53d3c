"""A small torch classifier on scikit-learn's bundled digits (8x8 images, no download), one PBT segment
per run of the script. Runs on the CPU; the same script runs in a GPU Job in Kubernetes.

    PBT_SEGMENT='{...}' python train.py        # normally started by `pbt run` or by the operator

`pbt run` runs it in warm workers: one interpreter per slot runs the script once per segment, so torch
is imported once per slot, and the data tensors (`pbt_worker.cached`) are loaded once per slot too.
`segment(seg)` trains one segment and is also usable inline (`worker: {executor: inline, function:
train:segment}`), e.g. by benchmarks/search_quality.py.

The metrics it reports include a fingerprint of the weights it restored and of the weights it saved,
so a test can prove that an exploit really copied the donor's weights, not only its hyperparameters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pbt_worker import Segment, cached
from torch import nn

torch.set_num_threads(int(os.environ.get("PBT_TORCH_THREADS", "1")))
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("PBT_CPU") != "1" else "cpu"


Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 8x8 images), read from the CSV file it ships, as
    `sklearn.datasets.load_digits(return_X_y=True)` reads it, but without importing scikit-learn (and
    SciPy): that import costs a process more CPU than all of its training segments together."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def _load() -> Data:
    x, y = _digits()
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))  # a fixed split, the same for every member
    x, y = x[order], y[order]
    n_train = 1400
    return (torch.from_numpy(x[:n_train]), torch.from_numpy(y[:n_train]),
            torch.from_numpy(x[n_train:]), torch.from_numpy(y[n_train:]))


def data() -> Data:
    """The fixed train/validation split, loaded once per process: a warm worker or an inline run
    executes many segments in one process, and the script's module-level globals start afresh with
    each run of the script, while `cached` values stay. Callers must not modify the tensors in place."""
    return cached("digits-data", _load)


def model(seed: int) -> nn.Module:
    """The network with initial weights drawn from its own generator (PyTorch's default uniform
    ranges), so a member's first weights, and therefore a replayed schedule, are reproducible even
    when several members train in threads of one process."""
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / layer.in_features ** 0.5
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
    return net


def fingerprint(m: nn.Module) -> str:
    h = hashlib.sha256()
    for t in m.state_dict().values():
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def segment(seg: Segment) -> dict[str, Any]:
    """Train one segment from the restored checkpoint, save, and report; returns the reported result."""
    hp = seg.hyperparameters
    lr, momentum, batch = float(hp["lr"]), float(hp["momentum"]), int(hp["batch_size"])
    xtr, ytr, xva, yva = (t.to(DEVICE) for t in data())
    net = model(seg.member).to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    state = seg.restore()
    restored = "none"
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restored = fingerprint(net)
    for group in opt.param_groups:  # the explored hyperparameters win over the restored optimizer's
        group["lr"], group["momentum"] = lr, momentum
    gen = torch.Generator().manual_seed(seg.member * 100_003 + seg.steps_start)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for _ in range(seg.steps_budget):
        idx = torch.randint(0, len(xtr), (batch,), generator=gen).to(DEVICE)
        opt.zero_grad()
        loss = loss_fn(net(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        logits = net(xva)
        val_loss = float(loss_fn(logits, yva))
        val_acc = float((logits.argmax(1) == yva).float().mean())
    seg.save({"model": net.state_dict(), "optimizer": opt.state_dict()})
    return seg.report(score=val_acc, loss=val_loss, train_loss=float(loss.detach()), restored_weights=restored,
                      saved_weights=fingerprint(net))


def main() -> None:
    segment(Segment.from_env())


if __name__ == "__main__":
    main()
