"""The worker SDK runs in slim training images: importing it must not drag in heavy or operator-side
packages (the image may not even have them)."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ["kopf", "kubernetes", "numpy", "yaml", "torch", "boto3", "botocore", "pbt_operator"]


def test_import_is_light() -> None:
    code = (
        "import sys, json, pbt_worker, pbt_worker.storage, pbt_worker.checkpoint;"
        "from pbt_worker.storage import open_storage; open_storage('file:///tmp/x/'); open_storage('mem://a/');"
        f"print(json.dumps([m for m in {FORBIDDEN!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
