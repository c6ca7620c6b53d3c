"""PB2's covariance: a time-varying, mixed continuous/categorical kernel with analytic gradients.

    k(z, z') = s2 * m(x, h; x', h') * (1 - eps) ** (|tau - tau'| / 2)

* `x` are the continuous inputs (the normalised score before the segment, then the numeric
  hyperparameters in unit space) under a squared-exponential kernel with one length scale per input
  (ARD): k_x = exp(-1/2 * sum_j (x_j - x'_j)^2 / l_j^2). Irrelevant hyperparameters get long length
  scales and stop mattering; that is why ARD beats one shared length scale beyond 2-3 dimensions.
* `tau` is time normalised over the data window. The factor (1 - eps)^(|tau - tau'|/2) is the
  time-varying kernel of TV-GP-UCB (Bogunovic et al. 2016) used by PB2: old observations are
  discounted smoothly instead of discarded. It is parametrised as exp(-rho |tau - tau'| / 2) with
  rho = -log(1 - eps) > 0, so eps may approach 1 (strong forgetting) while the optimiser works on
  log(rho) with well-scaled gradients. It is an exponential (Ornstein-Uhlenbeck) kernel in time,
  hence positive definite.
* `h` are categorical choices under the overlap (Hamming) kernel k_h = (1/q) sum_j [h_j == h'_j].
  Continuous and categorical parts are mixed as in CoCaBO / PB2-Mix:
      m = (1 - lam) * (k_x + k_h) / 2 + lam * k_x * k_h,
  a trade-off between "additive" (categories shift the rate independently of x) and "product"
  (the response surface over x differs per category), with lam fitted by marginal likelihood.
  The sum is halved (CoCaBO writes (1 - lam)(k_x + k_h)) so that m(z, z) = 1 for every lam and the
  signal variance s2 keeps its meaning; this is only a reparametrisation of s2 and lam.
  With no categorical hyperparameter, m = k_x. Categoricals are never one-hot encoded.

Hyperparameters live in a flat vector `theta` of logs (and a logit for lam), the coordinates in
which L-BFGS-B maximises the log marginal likelihood; `Layout` names the slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Bounds of the kernel hyperparameters, for standardised targets and unit-scaled inputs.
SIGNAL_BOUNDS = (math.log(0.05), math.log(20.0))
LENGTHSCALE_BOUNDS = (math.log(0.02), math.log(20.0))
DECAY_BOUNDS = (math.log(1e-3), math.log(50.0))  # rho = -log(1 - eps): eps from 1e-3 to 1 - 2e-22
MIX_BOUNDS = (-6.0, 6.0)  # logit(lam)
NOISE_BOUNDS = (math.log(1e-4), math.log(2.0))


@dataclass(frozen=True)
class Layout:
    """Positions in theta: [log s2, log l_1..l_dx, log rho, (logit lam if q > 0), log noise]."""

    dx: int  # continuous inputs (1 + number of numeric hyperparameters)
    q: int  # categorical hyperparameters

    @property
    def signal(self) -> int:
        return 0

    @property
    def lengthscales(self) -> slice:
        return slice(1, 1 + self.dx)

    @property
    def decay(self) -> int:
        return 1 + self.dx

    @property
    def mix(self) -> int | None:
        return 2 + self.dx if self.q > 0 else None

    @property
    def noise(self) -> int:
        return self.size - 1

    @property
    def size(self) -> int:
        return 3 + self.dx + (1 if self.q > 0 else 0)

    def bounds(self) -> list[tuple[float, float]]:
        b = [SIGNAL_BOUNDS, *([LENGTHSCALE_BOUNDS] * self.dx), DECAY_BOUNDS]
        if self.q > 0:
            b.append(MIX_BOUNDS)
        b.append(NOISE_BOUNDS)
        return b

    def default(self) -> np.ndarray:
        """A neutral starting point: unit signal, length scale 0.3, mild forgetting, lam 1/2."""
        th = np.empty(self.size)
        th[self.signal] = 0.0
        th[self.lengthscales] = math.log(0.3)
        th[self.decay] = math.log(0.5)
        if self.mix is not None:
            th[self.mix] = 0.0
        th[self.noise] = math.log(0.1)
        return th

    def random(self, rng: np.random.Generator) -> np.ndarray:
        lo, hi = np.array(self.bounds()).T
        # Sample well inside the box: restarts at the very edge rarely help.
        return lo + (hi - lo) * rng.uniform(0.15, 0.85, size=self.size)


@dataclass(frozen=True)
class Hyper:
    """theta decoded into natural units."""

    signal: float
    inv_l2: np.ndarray  # 1 / l_j^2
    rho: float
    lam: float
    noise: float

    @staticmethod
    def of(theta: np.ndarray, layout: Layout) -> Hyper:
        ls = np.exp(theta[layout.lengthscales])
        lam = 0.0
        if layout.mix is not None:
            lam = 1.0 / (1.0 + math.exp(-float(theta[layout.mix])))
        return Hyper(
            signal=math.exp(float(theta[layout.signal])),
            inv_l2=1.0 / (ls * ls),
            rho=math.exp(float(theta[layout.decay])),
            lam=lam,
            noise=math.exp(float(theta[layout.noise])),
        )

    @property
    def eps(self) -> float:
        """The paper's eps in (1 - eps)^(|t - t'| / 2)."""
        return -math.expm1(-self.rho)


def overlap(ha: np.ndarray, hb: np.ndarray) -> np.ndarray:
    """Hamming similarity: share of categorical hyperparameters on which two points agree."""
    q = ha.shape[1]
    out = np.zeros((ha.shape[0], hb.shape[0]))
    if q == 0:
        return out + 1.0
    for j in range(q):
        out += ha[:, j, None] == hb[None, :, j]
    return out / q


@dataclass(frozen=True)
class Pairwise:
    """Input differences between two point sets, independent of theta (computed once per fit)."""

    dt: np.ndarray  # (na, nb) |tau - tau'|
    hs: np.ndarray | None  # (na, nb) overlap similarity, None when q == 0
    # (dx + 1, na * nb): the squared differences per continuous input (flattened pairs) with
    # |tau - tau'| as a last row, so that one matrix product gives the exponent of k_x * time (and
    # one the length-scale and decay gradient sums).
    d2t: np.ndarray
    # (2 dx + 4, na * nb) when there are categoricals: [d2t, d2t * hs, 1, hs], so that the gradient
    # sums of the mixed kernel come from one matrix product (see gp.neg_log_marginal_batch).
    mix_design: np.ndarray | None
    dt_one: np.ndarray | None  # (2, na * nb): [dt, 1], the rows of mix_design the Q sums need

    @property
    def d2(self) -> np.ndarray:
        """(dx, na * nb) squared differences per continuous input (a view of d2t)."""
        return self.d2t[:-1]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.dt.shape[0]), int(self.dt.shape[1]))

    @staticmethod
    def of(tau_a: np.ndarray, xa: np.ndarray, ha: np.ndarray, tau_b: np.ndarray, xb: np.ndarray,
           hb: np.ndarray) -> Pairwise:
        diff = xa.T[:, :, None] - xb.T[:, None, :]
        d2 = (diff * diff).reshape(xa.shape[1], -1)
        dt = np.abs(tau_a[:, None] - tau_b[None, :])
        d2t = np.vstack([d2, dt.reshape(1, -1)])
        hs = overlap(ha, hb) if ha.shape[1] > 0 else None
        mix_design = dt_one = None
        if hs is not None:
            hs_flat = hs.reshape(1, -1)
            mix_design = np.vstack([d2t, d2t * hs_flat, np.ones_like(hs_flat), hs_flat])
            dt_one = np.vstack([d2t[-1:], np.ones_like(hs_flat)])
        return Pairwise(dt=dt, hs=hs, d2t=d2t, mix_design=mix_design, dt_one=dt_one)


@dataclass(frozen=True)
class Parts:
    """The factors of k for one theta, kept for gradients."""

    se: np.ndarray  # k_x
    time: np.ndarray  # exp(-rho |dt| / 2)
    mixed: np.ndarray  # m
    kf: np.ndarray  # s2 * m * time  (noise-free covariance)


def parts(hp: Hyper, pw: Pairwise) -> Parts:
    r2 = (hp.inv_l2 @ pw.d2).reshape(pw.shape)
    se = np.exp(-0.5 * r2)
    time = np.exp(-0.5 * hp.rho * pw.dt)
    if pw.hs is None:
        mixed = se
    else:
        mixed = 0.5 * (1.0 - hp.lam) * (se + pw.hs) + hp.lam * se * pw.hs
    return Parts(se=se, time=time, mixed=mixed, kf=hp.signal * mixed * time)


def cross(theta: np.ndarray, layout: Layout, tau_a: np.ndarray, xa: np.ndarray, ha: np.ndarray,
          tau_b: np.ndarray, xb: np.ndarray, hb: np.ndarray) -> np.ndarray:
    """Noise-free covariance matrix between two point sets (no gradients, so no per-input
    difference tensors: the scaled squared distance comes from one matrix product)."""
    hp = Hyper.of(theta, layout)
    scale = np.sqrt(hp.inv_l2)
    a = xa * scale
    b = xb * scale
    r2 = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T)
    se = np.exp(-0.5 * np.maximum(r2, 0.0))
    time = np.exp(-0.5 * hp.rho * np.abs(tau_a[:, None] - tau_b[None, :]))
    if layout.q:
        hs = overlap(ha, hb)
        mixed = 0.5 * (1.0 - hp.lam) * (se + hs) + hp.lam * se * hs
    else:
        mixed = se
    return hp.signal * mixed * time


def gram_grads(theta: np.ndarray, layout: Layout, pw: Pairwise, pt: Parts | None = None) -> list[np.ndarray]:
    """dK/dtheta_i for every slot of theta (K including the noise term), on a square Pairwise.

    The reference statement of the kernel's derivatives, checked against finite differences;
    `gp.neg_log_marginal_batch` uses the same formulas but contracts them with
    (alpha alpha^T - K^-1) without materialising one matrix per length scale.
    """
    hp = Hyper.of(theta, layout)
    pt = pt if pt is not None else parts(hp, pw)
    n = pt.kf.shape[0]
    out: list[np.ndarray] = [pt.kf.copy()]
    dm_dse = dmixed_dse(hp, pw)
    base = hp.signal * pt.time * dm_dse * pt.se
    for j in range(layout.dx):
        out.append(base * pw.d2[j].reshape(pw.shape) * hp.inv_l2[j])
    out.append(pt.kf * (-0.5 * hp.rho * pw.dt))
    if layout.mix is not None:
        assert pw.hs is not None
        dm_dlam = -0.5 * (pt.se + pw.hs) + pt.se * pw.hs
        out.append(hp.signal * pt.time * dm_dlam * hp.lam * (1.0 - hp.lam))
    out.append(hp.noise * np.eye(n))
    return out


def dmixed_dse(hp: Hyper, pw: Pairwise) -> np.ndarray | float:
    """dm / dk_x (1 without categoricals)."""
    if pw.hs is None:
        return 1.0
    return 0.5 * (1.0 - hp.lam) + hp.lam * pw.hs
