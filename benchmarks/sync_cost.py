"""What one durability barrier of `pbt run` costs: `syncfs` of the whole filesystem, or `fsync` of just
the files and folders the batch wrote (serially, or from parallel threads), on a filesystem that is
busy with someone else's writes and on one that is quiet.

    .venv/bin/python benchmarks/sync_cost.py --dir DIR [--batches 40] [--batch 1] [--size-kib 1]
        [--noise-mib-s 0] [--threads 8]

Each batch writes what a batch of finished segments writes under `pbt run` with `file://`: per
segment a new checkpoint folder `mNNN/SSSSS/` holding an object and a marker (each written to a
temporary name and renamed, no fsync: as the workers do under the barrier), plus one line appended to
each of two journal files; then makes it durable by one method and times that. `--noise-mib-s N`
runs a writer process that writes N MiB/s of random data to a file in the same folder without ever
syncing it (another program's disk activity: its dirty pages are what `syncfs` also has to write).
Prints the median and 90th percentile per method (ms per barrier); the methods take turns batch by
batch, so a change in the machine's load hits all of them alike. Asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "operator"))

from pbt_operator.local.durability import fsync_tree, sync_filesystems  # noqa: E402


def write_checkpoint(folder: Path, size: int) -> None:
    try:
        folder.mkdir()
    except FileNotFoundError:
        folder.mkdir(parents=True)
    for name, data in (("state.pt", os.urandom(size)), ("_pbt_checkpoint.json", b'{"ok": true}')):
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / name)


def noise(path: Path, mib_s: float, stop: Any) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        t = time.monotonic()
        written = 0
        while not stop.is_set():
            f.write(chunk)
            written += 1
            if written % 256 == 0:  # keep the file from filling the disk
                f.seek(0)
            ahead = written / mib_s - (time.monotonic() - t)
            if ahead > 0:
                stop.wait(ahead)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1, help="finished segments per barrier")
    ap.add_argument("--size-kib", type=int, default=1)
    ap.add_argument("--noise-mib-s", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args(argv)
    root = args.dir / f"sync-cost-{os.getpid()}"
    root.mkdir(parents=True)
    journal = [open(root / "results.jsonl", "a"), open(root / "suggestions.jsonl", "a")]  # noqa: SIM115
    pool = ThreadPoolExecutor(args.threads)
    methods: dict[str, Callable[[list[Path]], None]] = {
        "syncfs": lambda dirs: sync_filesystems([root]),
        "fsync-serial": lambda dirs: fsync_tree(dirs, [f.fileno() for f in journal], root),
        "fsync-threads": lambda dirs: fsync_tree(dirs, [f.fileno() for f in journal], root, pool=pool),
    }
    stop = multiprocessing.Event()
    noisy = None
    if args.noise_mib_s > 0:  # another process, as another program would be
        noisy = multiprocessing.Process(target=noise, args=(root / "noise.bin", args.noise_mib_s, stop), daemon=True)
        noisy.start()
        time.sleep(2)  # let dirty pages build up
    times: dict[str, list[float]] = {m: [] for m in methods}
    seg = 0
    try:
        for _ in range(args.batches):
            for name, method in methods.items():
                dirs = []
                for _ in range(args.batch):
                    d = root / f"m{seg % 16:03d}" / f"{seg // 16:05d}"
                    write_checkpoint(d, args.size_kib * 1024)
                    dirs.append(d)
                    seg += 1
                    for f in journal:
                        f.write('{"member": 0, "segment": 0, "score": 1.0}\n')
                for f in journal:
                    f.flush()
                t = time.perf_counter()
                method(dirs)
                times[name].append((time.perf_counter() - t) * 1e3)
    finally:
        stop.set()
        if noisy:
            noisy.join()
        pool.shutdown()
    load = os.getloadavg()[0]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    dirty = next((line.split()[1] for line in meminfo if line.startswith("Dirty:")), "?")
    print(f"dir={args.dir} batch={args.batch} size={args.size_kib} KiB noise={args.noise_mib_s} MiB/s "
          f"batches={args.batches} load={load:.1f} dirty_at_end={dirty} kB")
    print("| method | median ms | p90 ms |")
    print("|---|---|---|")
    for name, ts in times.items():
        ts.sort()
        # nearest rank: the smallest time at or above 90% of the batches (with few batches, the maximum)
        print(f"| {name} | {statistics.median(ts):.2f} | {ts[math.ceil(0.9 * len(ts)) - 1]:.2f} |")


if __name__ == "__main__":
    main()
