"""Entry point of the quadratic worker image (examples/quadratic/Dockerfile): one segment of
``quadratic.segment`` per container run, driven by the segment contract in ``PBT_SEGMENT``.

It prints what it restored and what it reached, so ``kubectl logs`` of a segment pod tells the story
(and the real-node tests check that an exploit restored the donor's weights).
"""

from __future__ import annotations

from typing import Any

import pbt_worker
import quadratic


def segment(seg: Any) -> dict[str, float]:
    source = seg.restore_uri or "scratch"
    state = seg.restore()
    theta = list(state["theta"]) if state is not None else list(quadratic.THETA0)
    print(f"segment m{seg.member}/s{seg.index} restore={source} theta={theta} hp={seg.hyperparameters}",
          flush=True)
    # quadratic.segment restores again; hand it the state we already read instead of a second download
    seg.restore = lambda **_: state  # type: ignore[method-assign]
    result = quadratic.segment(seg)
    print(f"segment m{seg.member}/s{seg.index} saved={seg.checkpoint_uri} theta={[result['theta0'], result['theta1']]} "
          f"score={result['score']:.6f}", flush=True)
    return result


if __name__ == "__main__":
    pbt_worker.run(segment)
