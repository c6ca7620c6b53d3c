"""Every random draw of the algorithm comes from here.

A stream is keyed by (seed, member, segment, purpose), so a decision never depends on how many draws
other members made before it, on thread timing, or on whether the driver restarted in between.
"""

from __future__ import annotations

import numpy as np

# Purposes: separate streams for separate questions asked about the same (member, segment).
INITIAL = 0
EXPLOIT = 1
EXPLORE = 2
PB2 = 3
RETUNE = 4  # PB2's retune of a member that keeps its weights


def rng_for(seed: int, member: int, segment: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, member, segment, purpose])))
