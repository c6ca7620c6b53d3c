"""The toy problem of the PBT paper (Jaderberg et al. 2017, section 4.1).

We want to maximise Q(theta) = 1.2 - (theta0^2 + theta1^2), but a member can only follow the gradient
of a *surrogate* Q_hat(theta | h) = 1.2 - (h0 * theta0^2 + h1 * theta1^2), where h are the
hyperparameters. A member whose h0 or h1 is small barely moves in that coordinate; PBT fixes this by
copying the best theta (exploit) and perturbing h (explore). The score is always the true Q.
"""

from __future__ import annotations

from typing import Any

LEARNING_RATE = 0.01
THETA0 = (0.9, 0.9)


def true_objective(theta: tuple[float, float]) -> float:
    return 1.2 - (theta[0] ** 2 + theta[1] ** 2)


def segment(seg: Any) -> dict[str, float]:
    """One segment: `steps.budget` gradient steps on the surrogate, from the restored theta."""
    state = seg.restore()
    theta = list(state["theta"]) if state is not None else list(THETA0)
    h0 = float(seg.hyperparameters["h0"])
    h1 = float(seg.hyperparameters["h1"])
    for _ in range(seg.steps_budget):
        # gradient of Q_hat w.r.t. theta is -2 h * theta; ascend it
        theta[0] += LEARNING_RATE * (-2.0 * h0 * theta[0])
        theta[1] += LEARNING_RATE * (-2.0 * h1 * theta[1])
    seg.save({"theta": theta})
    q = true_objective((theta[0], theta[1]))
    return {"score": q, "theta0": theta[0], "theta1": theta[1]}
