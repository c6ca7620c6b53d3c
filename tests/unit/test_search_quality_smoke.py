"""Smoke test of benchmarks/search_quality.py and its problems: tiny budgets, real engine."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _benchmark_module(name: str):
    """Load benchmarks/<name>.py under a private name (benchmarks/ is not a package), then unload it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def sq():
    yield from _benchmark_module("search_quality")


@pytest.fixture(scope="module")
def P():  # benchmarks/problems.py, by its usual short name
    yield from _benchmark_module("problems")


def test_every_method_gets_the_same_budget_and_a_row(sq):
    quick = replace(sq.PROBLEMS["lr-schedule"], segments=4)
    sq.PROBLEMS["quick"] = quick
    try:
        runs = [sq.simulate(quick, m, 4, seed) for m in sq.METHODS for seed in range(2)]
        limits = {("quick", 4): quick.limit(4, 0)}
        rows = sq.summarise(runs, limits)
    finally:
        del sq.PROBLEMS["quick"]
    assert {r.segments for r in runs} == {4 * 4}
    assert [r.method for r in rows] == list(sq.METHODS) and all(r.seeds == 2 for r in rows)
    for row in rows:
        assert row.q25 <= row.median <= row.q75
    table = sq.format_table(rows)
    for m in sq.METHODS:
        assert sum(1 for line in table.splitlines() if f" {m} " in line) == 1
    # deterministic given the seed (the engine's CPU time aside)
    a = sq.simulate(quick, "pb2-bucb", 4, 1)
    b = sq.simulate(quick, "pb2-bucb", 4, 1)
    assert (a.final, a.pb2_fallbacks) == (b.final, b.pb2_fallbacks)
    assert a.final != sq.simulate(quick, "pb2-bucb", 4, 2).final


def test_oracle_is_the_limit_of_a_fixed_good_configuration(P):
    lr = P.LR_SCHEDULE
    limit = lr.limit(4, 0)
    rng = np.random.default_rng(0)
    fixed = 0.0
    for k in range(lr.segments):
        fixed = lr.train(fixed, {"lr": 1e-2}, k * lr.steps, lr.steps, rng)
    assert 0.3 * limit < fixed < 0.9 * limit  # a fixed rate, even the middle one, leaves much on the table
    assert limit == pytest.approx(100.0, rel=0.05)
    # the best optimizer flips mid-training
    assert P._cat_best(0, 0.0)["optimizer"] == "adam" and P._cat_best(60, 0.0)["optimizer"] == "sgd"
    # RL: exact expected return of a policy that always goes right beats one that always goes left
    right = np.zeros((P.CHAIN, 2))
    right[:, 1] = 10.0
    left = -right
    assert P.rl_expected_return(right) > 0.9 > P.TRAP * P.HORIZON >= P.rl_expected_return(left) > 0.3
    assert math.isfinite(replace(P.RL, segments=3).limit(2, 0))


@pytest.fixture(scope="module")
def fixed():
    yield from _benchmark_module("fixed_configs")


def test_fixed_grid_covers_the_space_within_its_size(fixed):
    cat = fixed.grid(fixed.PROBLEMS["cat-flip"], 21)
    assert len(cat) == 3 * 21 and {c["optimizer"] for c in cat} == {"sgd", "adam", "rmsprop"}
    lrs = sorted({c["lr"] for c in cat})
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 0.25)  # log-spaced: the space says log
    two = fixed.grid(fixed.PROBLEMS["rl"], 21)  # two numbers: fewer values per axis, at most 64 in all
    assert len(two) == 64 and len({c["lr"] for c in two}) == 8
    quad = fixed.grid(fixed.PROBLEMS["quadratic"], 3)
    assert sorted({c["h0"] for c in quad}) == [0.0, 0.5, 1.0]  # linear space: evenly spaced


def test_no_fixed_configuration_reaches_the_limit_where_the_optimum_moves(fixed):
    """What makes lr-schedule and cat-flip tests of moving optima: the best fixed configuration of a
    fine grid, with hindsight, stays far below the limit (benchmarks/README.md measures the gap with
    fixed_configs.py); on the stationary quadratic it reaches the limit."""
    for name, at_most in (("lr-schedule", 0.7), ("cat-flip", 0.75)):
        prob = fixed.PROBLEMS[name]
        limit = prob.limit(4, 0)
        best = max(fixed.fixed_run(prob, hp, 0, 0) for hp in fixed.grid(prob, 21))
        assert best < at_most * limit, name
    quad = fixed.PROBLEMS["quadratic"]
    assert max(fixed.fixed_run(quad, hp, 0, 0) for hp in fixed.grid(quad, 5)) == pytest.approx(quad.limit(4, 0))


def test_cat_flip_optima_are_drawn_per_seed_and_shared_within_one(P):
    a, b = P.CAT_FLIP.for_seed(0), P.CAT_FLIP.for_seed(1)
    assert P.cat_optimizers(0) == P.cat_optimizers(0) != P.cat_optimizers(1)
    for name, (lr, early, late) in P.cat_optimizers(3).items():
        nominal = P.OPTIMIZERS[name]
        assert abs(lr - nominal[0]) <= P.CAT_SPREAD and (early, late) == nominal[1:]
    # the oracle of a seed trains at that seed's optimum, and training there is the fastest
    best = a.best_hp(0, 0.0)
    assert best["optimizer"] == "adam" and best["lr"] == pytest.approx(10.0 ** P.cat_optimizers(0)["adam"][0])
    rng = np.random.default_rng(0)
    at_best = a.train(0.0, best, 0, 5, rng)
    elsewhere = a.train(0.0, {"optimizer": "adam", "lr": best["lr"] * 10 ** 0.4}, 0, 5, np.random.default_rng(0))
    assert at_best > elsewhere
    assert b.best_hp(60, 0.0)["optimizer"] == "sgd" and P.RL.for_seed(5) is P.RL


def test_rl_reach_needs_a_schedule(fixed, P):
    """rl-reach is a test of moving optima only if no fixed configuration comes near its limit: exploring
    widely is what finds the target and what costs reward there, and the advantages' scale grows by
    orders of magnitude on the way. The best fixed configuration of the grid stays below 0.8 of the
    limit (benchmarks/README.md, `fixed_configs.py --problems rl-reach`); the oracle's schedule is in
    the family it was chosen from and reaches the task's maximum return (1, at zero exploration)."""
    prob = fixed.PROBLEMS["rl-reach"]
    limit = prob.limit(4, 0)
    assert 0.95 < limit <= 1.0
    best = max(max(fixed.fixed_run(prob, hp, 0, m) for m in range(4)) for hp in fixed.grid(prob, 21))
    assert best < 0.8 * limit
    start = {k: a for k, (a, _) in P.REACH_SCHEDULE.items()}
    end = {k: b for k, (_, b) in P.REACH_SCHEDULE.items()}
    assert fixed.schedule_run(prob, start, end, 0) > 0.95
    assert fixed.schedule_run(prob, end, end, 0) == fixed.fixed_run(prob, end, 0, 0)  # constants are in the family
    # the exact expected return: exploration costs reward at the target; the mean's offset costs more
    at = P.reach_expected_return(P.REACH_TARGET, 1.0)
    assert at == pytest.approx(0.5) and P.reach_expected_return(P.REACH_TARGET + 1.0, 1.0) < at
    rng = np.random.default_rng(3)
    a = P.REACH_TARGET + 0.3 + rng.standard_normal((200_000, P.REACH_DIM))
    sampled = np.exp(-np.sum((a - P.REACH_TARGET) ** 2, axis=1) / 2.0).mean()
    assert sampled == pytest.approx(P.reach_expected_return(P.REACH_TARGET + 0.3, 1.0), rel=0.01)


def test_lr_family_draws_its_shape_per_seed_within_the_documented_ranges(P):
    shapes = [P.lr_family_shape(s) for s in range(60)]
    assert P.lr_family_shape(7) == P.lr_family_shape(7) != P.lr_family_shape(8)
    assert {s.path for s in shapes} == {"bell", "warm-up", "decay"}
    assert {s.saturation is None for s in shapes} == {True, False}  # both score kinds occur
    for sh in shapes:
        path = [sh.optimum(t) for t in range(P.LR_ITERS + 1)]
        assert sh.low + 0.5 - 1e-9 <= min(path) and max(path) <= sh.high - 0.5 + 1e-9  # inside the space
        assert 3.0 <= sh.high - sh.low <= 6.0 + 1e-9 and 0.3 <= sh.width <= 1.0 and 0.5 <= sh.noise <= 2.0
        assert max(path) - min(path) == pytest.approx(sh.height, abs=0.01) and 1.0 <= sh.height <= 3.0
        if sh.path == "warm-up":
            assert all(b >= a for a, b in itertools.pairwise(path))
        elif sh.path == "decay":
            assert all(b <= a for a, b in itertools.pairwise(path))
        else:  # up to the peak, then down
            top = int(np.argmax(path))
            assert 0.2 * P.LR_ITERS - 1 <= top <= 0.8 * P.LR_ITERS + 1 and path[0] < path[top] > path[-1]
    # the instance of a seed: its own space, its own oracle, and a saturating score where drawn
    sat = next(s for s in range(60) if P.lr_family_shape(s).saturation is not None)
    prob, sh = P.LR_FAMILY.for_seed(sat), P.lr_family_shape(sat)
    assert prob.hyperparameters["lr"]["min"] == pytest.approx(10.0 ** sh.low)
    assert prob.classes is not None and prob.classes["score"] == "saturating"
    limit = prob.limit(4, sat)
    assert 0.5 < limit < 1.0  # an accuracy: the oracle's late progress is small in absolute terms
    best = prob.best_hp(40, 0.0)
    at_best = prob.train(10.0, best, 40, 5, np.random.default_rng(0))
    off = prob.train(10.0, {"lr": best["lr"] * 10 ** (2 * sh.width)}, 40, 5, np.random.default_rng(0))
    assert prob.true_score(at_best) > prob.true_score(off)
    diverged = prob.train(0.0, {"lr": best["lr"] * 1e3}, 40, 5, np.random.default_rng(0))
    assert diverged == 0.0 and prob.true_score(diverged) == 0.0  # an accuracy is no worse than untrained
    assert P.LR_FAMILY.for_seed(sat).limit(4, sat) == limit != P.LR_FAMILY.for_seed(sat + 1).limit(4, sat + 1)


def test_per_seed_problems_are_measured_against_each_seed_s_own_limit(sq):
    R = sq.RunResult
    runs = [R("lr-family", "pbt", 4, 0, 0.5, 80, 0.0), R("lr-family", "pbt", 4, 1, 50.0, 80, 0.0),
            R("lr-family", "pb2-bucb", 4, 0, 0.9, 80, 0.0), R("lr-family", "pb2-bucb", 4, 1, 40.0, 80, 0.0)]
    seed_limits = {("lr-family", 4, 0): 1.0, ("lr-family", 4, 1): 100.0}
    rows = {r.method: r for r in sq.summarise(runs, {("lr-family", 4): 50.0}, seed_limits)}
    assert (rows["pbt"].q25, rows["pbt"].q75) == pytest.approx((0.5, 0.5))  # not 0.01 and 1.0 of a median limit
    assert rows["pb2-bucb"].median == pytest.approx(0.65) and rows["pb2-bucb"].vs_pbt == "1/0/1"
    assert "seed" in sq.format_table(list(rows.values()))
    by = sq.class_rows(runs, {}, seed_limits)
    keys = {(c.key, c.value) for c in by}
    assert ("path", sq.PROBLEMS["lr-family"].for_seed(0).classes["path"]) in keys
    assert sum(c.seeds for c in by if c.key == "score" and c.method == "pbt") == 2


# (problem, number of hyperparameters, nuisance ones, one relevant hyperparameter moved off its optimum)
MANY = [
    ("lr-schedule-3d", 3, (), {"x1": 1.0}),
    ("lr-schedule-5d", 5, ("x3", "x4"), {"x1": 1.0}),
    ("lr-schedule-10d", 10, tuple(f"x{i}" for i in range(4, 10)), {"x1": 1.0}),
    ("lr-schedule-mixed", 4, (), {"batch": 8}),
    ("lr-schedule-mixed", 4, (), {"optimizer": "sgd"}),
]


@pytest.mark.parametrize(("name", "dims", "nuisance", "moved"), MANY)
def test_many_hyperparameter_problems_reward_only_their_relevant_ones(P, sq, name, dims, nuisance, moved):
    many = P.PROBLEMS[name]
    assert len(many.hyperparameters) == dims and name in P.OPT_IN and name not in P.NONSTATIONARY
    # at the relevant optima it is lr-schedule, so its limit is lr-schedule's
    assert many.limit(4, 0) == pytest.approx(P.LR_SCHEDULE.limit(4, 0), rel=0.05)

    def final(hp_at):  # one member, noise-free comparisons via a fixed rng
        rng = np.random.default_rng(3)
        state = many.init(rng)
        for k in range(many.segments):
            state = many.train(state, hp_at(k * many.steps), k * many.steps, many.steps, rng)
        return many.true_score(state)

    best = final(lambda t0: many.best_hp(t0, 0.0))
    nuisance_moved = final(lambda t0: {**many.best_hp(t0, 0.0), **{n: 0.0 for n in nuisance}})
    relevant_moved = final(lambda t0: {**many.best_hp(t0, 0.0), **moved})
    assert nuisance_moved == pytest.approx(best)
    assert relevant_moved < 0.8 * best
    # the real engine runs it (PB2 over all its dimensions)
    quick = replace(many, name=f"quick-{name}", segments=3)
    sq.PROBLEMS[quick.name] = quick
    try:
        run = sq.simulate(quick, "pb2-liar-pessimistic", 4, 0)
    finally:
        del sq.PROBLEMS[quick.name]
    assert run.segments == 3 * 4 and math.isfinite(run.final)


def test_mode_and_interval_reach_the_engine_and_the_limit(sq, P, monkeypatch, tmp_path):
    """`--mode synchronous` decides at barriers (a whole generation per tell), `--interval` cuts the same
    training into more or fewer segments, for the members and the oracle alike, and both are recorded."""
    batches: list[int] = []

    class Recording(sq.Engine):
        def tell(self, result):
            out = super().tell(result)
            if out:
                batches.append(len(out))
            return out

    monkeypatch.setattr(sq, "Engine", Recording)
    quick = replace(sq.PROBLEMS["lr-schedule"], segments=4)
    sync = sq.simulate(quick, "pb2-liar-pessimistic", 4, 0, mode="synchronous")
    assert sync.mode == "synchronous" and set(batches) == {4} and len(batches) == 3  # 3 barriers after the start
    batches.clear()
    asyn = sq.simulate(quick, "pb2-liar-pessimistic", 4, 0)
    assert asyn.mode == "asynchronous" and set(batches) == {1} and len(batches) == 4 * 3
    monkeypatch.undo()

    lr = P.LR_SCHEDULE
    ten = lr.with_interval(10)
    assert (ten.segments, ten.steps, ten.iterations) == (10, 10, lr.iterations) and lr.with_interval(5) is lr
    assert ten.best_hp(0, 0.0)["lr"] == pytest.approx(10.0 ** P.lr_optimum(4.5))  # the longer segment's middle
    assert ten.limit(4, 0) < lr.limit(4, 0)  # the oracle too exploits only every 10 iterations
    with pytest.raises(ValueError, match="does not divide"):
        lr.with_interval(3)
    reach = P.RL_REACH.with_interval(20)  # the oracle's schedule still runs from its first value to its last
    assert reach.best_hp(80, None) == pytest.approx(P.geometric_schedule(P.REACH_SCHEDULE, 19, 20))

    out = tmp_path / "sq.json"
    monkeypatch.setattr(sq, "LIMIT_CACHE", tmp_path / "limits.json")
    assert sq.main(["--seeds", "1", "--pops", "2", "--problems", "lr-schedule", "--methods", "pbt", "--jobs", "1",
                    "--quiet", "--mode", "synchronous", "--interval", "10", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["mode"], data["interval"]) == ("synchronous", 10)
    assert [(r["mode"], r["interval"], r["segments"]) for r in data["runs"]] == [("synchronous", 10, 2 * 10)]
    assert data["limits"]["lr-schedule/2"] == pytest.approx(ten.limit(2, 0))
    assert set(json.loads((tmp_path / "limits.json").read_text())) == {"lr-schedule@10/2/0"}


# -- benchmarks/api_quality.py: search_quality's problems through `pbt_operator.run` (tiny) -----------------


@pytest.fixture(scope="module")
def aq():
    yield from _benchmark_module("api_quality")


def _quick(aq):
    return replace(aq.PROBLEMS["lr-schedule"], segments=2)


@pytest.mark.parametrize("mode", ["asynchronous", "synchronous"])
def test_a_run_through_the_local_runner_gives_a_finite_fraction(aq, tmp_path, mode):
    quick = _quick(aq)
    r = aq.run_api(quick, "pb2-liar-pessimistic", 2, 0, tmp_path, mode=mode, ms_per_step=0.5)
    assert r.segments == 2 * 2
    frac = r.final / quick.limit(2, 0)
    assert math.isfinite(frac) and 0.0 < frac < 1.5
    # the simulator's run of the same spec measures the same thing
    s = aq.sq.simulate(quick, "pb2-liar-pessimistic", 2, 0, mode)
    assert s.segments == r.segments and math.isfinite(s.final)


def test_a_segment_that_does_not_restore_its_checkpoint_fails_the_benchmark(aq, tmp_path, monkeypatch):
    from pbt_worker.segment import Segment

    monkeypatch.setattr(Segment, "restore", lambda self, **kw: None)  # every segment starts from scratch
    with pytest.raises(RuntimeError, match="not restored"):
        aq.run_api(_quick(aq), "pbt", 2, 0, tmp_path, ms_per_step=0.5)


def test_the_json_is_what_paired_py_reads(aq, tmp_path, monkeypatch):
    monkeypatch.setitem(aq.PROBLEMS, "lr-schedule", _quick(aq))
    monkeypatch.setattr(aq.sq, "LIMIT_CACHE", tmp_path / "limits.json")  # not the shared cache: a tiny problem
    out = tmp_path / "api.json"
    assert aq.main(["--seeds", "1", "--pops", "2", "--problems", "lr-schedule", "--ms-per-step", "0.5",
                    "--quiet", "--out", str(out)]) == 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import paired
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    runs = paired.load(out, "pb2-liar-pessimistic")
    assert list(runs) == [("lr-schedule", 2, 0)] and math.isfinite(runs[("lr-schedule", 2, 0)][0])
    assert len(json.loads(out.read_text())["rows"]) == 2


# -- benchmarks/peer_ray.py: a peer's schedulers on the same problems (Ray Tune is not installed here) -------


@pytest.fixture(scope="module")
def peer():
    yield from _benchmark_module("peer_ray")


def test_the_peer_searches_log_ranges_as_logs_and_categoricals_as_an_index(peer, P):
    space = P.PROBLEMS["cat-flip"].hyperparameters
    bounds = peer.pb2_bounds(space)
    assert bounds == {"index_optimizer": [0.0, 3.0], "log10_lr": [pytest.approx(-5.0), pytest.approx(0.0)]}
    hp = peer.decode({"index_optimizer": 2.999, "log10_lr": -2.0}, space)
    assert hp == {"optimizer": space["optimizer"]["choices"][2], "lr": pytest.approx(0.01)}
    # the upper bound itself, and PBT's own encoding, decode too
    assert peer.decode({"index_optimizer": 3.0, "log10_lr": 0.0}, space)["optimizer"] == space["optimizer"]["choices"][-1]
    assert peer.decode({"optimizer": "adam", "lr": 0.5}, space) == {"optimizer": "adam", "lr": 0.5}


def test_the_peer_rounds_and_clamps_an_int(peer):
    space = {"batch": {"type": "int", "min": 8, "max": 1024, "log": True}, "x": {"type": "float", "min": 0.0, "max": 1.0}}
    assert peer.pb2_bounds(space) == {"log10_batch": [pytest.approx(math.log10(8)), pytest.approx(math.log10(1024))],
                                      "x": [0.0, 1.0]}
    assert peer.decode({"log10_batch": math.log10(1024) + 1e-9, "x": 0.25}, space) == {"batch": 1024, "x": 0.25}
    assert peer.decode({"log10_batch": math.log10(100.4)}, {"batch": space["batch"]}) == {"batch": 100}


def test_a_peer_method_gets_its_own_row_without_a_pbt_pairing(sq):
    runs = [sq.RunResult("lr-schedule", "ray-pb2", 4, s, 50.0 + s, 80, 0.0) for s in range(3)]
    rows = sq.summarise(runs, {("lr-schedule", 4): 100.0})
    assert [(r.method, r.seeds, r.median, r.vs_pbt) for r in rows] == [("ray-pb2", 3, pytest.approx(0.51), "-")]


def test_the_peer_script_says_how_to_install_ray_when_it_is_missing(peer, capsys):
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed in this environment")
    with pytest.raises(SystemExit) as e:
        peer.main(["--seeds", "1"])
    assert e.value.code == 2 and "Ray Tune is not installed" in capsys.readouterr().err


def test_the_peer_comparison_pools_peer_files_and_compares_only_common_seeds(peer, tmp_path, capsys):
    def run(method, seed, final):
        return {"problem": "lr-schedule", "method": method, "seed": seed, "final": final, "limit": 100.0}

    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"runs": [run("pb2-liar-pessimistic", s, 80.0 + s) for s in range(4)]}))
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"runs": [run("ray-pb2", 0, 60.0), run("ray-pb2", 1, 62.0)]}))
    second.write_text(json.dumps({"runs": [run("ray-pb2", 2, 64.0), run("ray-pb2", 9, 0.0)]}))  # seed 9: not ours
    assert peer.main(["--compare", str(ours), str(first), str(second)]) == 0
    line, = capsys.readouterr().out.splitlines()
    assert "seeds   3" in line and "0.810 - ray-pb2  0.620 = +0.190" in line
    d, lo, hi = peer.median_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert d == 2.0 and 1.0 <= lo <= d <= hi <= 3.0
