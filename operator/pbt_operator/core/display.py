"""How hyperparameters and scores are written for people: `pbt run`'s progress table and summary, the
members' printer column in Kubernetes, Events. Both drivers use these, so they live in the core."""

from __future__ import annotations

from collections.abc import Mapping

ELLIPSIS = "..."


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun, singular only for one: '1 segment', '0 segments', '3 checkpoints'."""
    return f"{n} {noun if n == 1 else (plural if plural is not None else noun + 's')}"


def shorten(text: str, limit: int, *, keep_end: bool = False) -> str:
    """`text` in at most `limit` characters, for anything a user reads (hyperparameters in a table, a
    failed trainer's message in a condition, a log line). One rule for every such place, so that a cut
    text looks the same wherever it shows: text that fits is returned unchanged; a longer one keeps its
    start and ends with "..." inside the limit (the head of an error says what failed). `keep_end=True`
    is for log tails and tracebacks, whose end is what matters: the last `limit` characters, without
    a mark (the text is a tail already)."""
    if len(text) <= limit:
        return text
    if keep_end:
        return text[-limit:] if limit > 0 else ""
    if limit <= len(ELLIPSIS):
        return text[:max(limit, 0)]
    return text[:limit - len(ELLIPSIS)] + ELLIPSIS


def fmt_value(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_hp(hp: Mapping[str, object], limit: int = 48) -> str:
    """'lr=0.01 opt=adam', cut to `limit` characters."""
    s = " ".join(f"{k}={fmt_value(v)}" for k, v in hp.items())
    return shorten(s, limit)


def describe_change(old: Mapping[str, object], new: Mapping[str, object]) -> str:
    """'lr 0.01->0.012, opt sgd->adam' for Events and logs."""
    parts = [f"{k} {fmt_value(old.get(k))}->{fmt_value(v)}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(parts) if parts else "unchanged"


__all__ = ["describe_change", "fmt_hp", "fmt_value", "shorten"]
