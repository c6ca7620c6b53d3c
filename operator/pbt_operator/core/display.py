"""How hyperparameters and scores are written for people: `pbt run`'s progress table and summary, the
members' printer column in Kubernetes, Events. Both drivers use these, so they live in the core."""

from __future__ import annotations

from collections.abc import Mapping


def fmt_value(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_hp(hp: Mapping[str, object], limit: int = 48) -> str:
    """'lr=0.01 opt=adam', cut to `limit` characters."""
    s = " ".join(f"{k}={fmt_value(v)}" for k, v in hp.items())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def describe_change(old: Mapping[str, object], new: Mapping[str, object]) -> str:
    """'lr 0.01->0.012, opt sgd->adam' for Events and logs."""
    parts = [f"{k} {fmt_value(old.get(k))}->{fmt_value(v)}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(parts) if parts else "unchanged"


__all__ = ["describe_change", "fmt_hp", "fmt_value"]
