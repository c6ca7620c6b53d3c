"""What every manifest field means: one source for the CRD's descriptions (`kubectl explain`) and the
table in docs/manifest.md, so the two cannot say different things.

Each entry: the field's path, its type and default as the table shows them, what it means, and whether
it is a row of the table (sub-fields of a row such as `spec.objective.metric` only describe the CRD).
Enumerations come from core/choices.py. `python -m pbt_operator.fielddocs --write docs/manifest.md`
regenerates the table; a unit test fails when either output is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .core.choices import (
    DIRECTIONS,
    EXECUTORS,
    EXPLOIT_STRATEGIES,
    EXPLORE_STRATEGIES,
    INLINE_POOLS,
    MODES,
    ON_EXHAUSTED,
    ON_SUSPEND,
    PARAM_KINDS,
    PB2_PARALLEL,
)


@dataclass(frozen=True)
class Field:
    path: str  # e.g. spec.exploit.fraction; NAME stands for a map key
    kind: str  # type and default, as the docs table shows them (enumerations: exactly their values)
    meaning: str
    row: bool = True  # a row of the docs table (else: only a CRD description)


def _alts(values: tuple[str, ...]) -> str:
    return " \\| ".join(f"`{v}`" for v in values)


WARM = ("process executor: a `python SCRIPT` or `python -m MODULE` command runs in one long-lived interpreter per "
        "slot, segment after segment (imports and `pbt_worker.cached` values are kept; a failed, crashed or "
        "timed-out segment ends its interpreter); `false`: a fresh process per segment, as a Kubernetes Job. Other "
        "commands always get a fresh process. See [worker.md](worker.md#warm-workers-pbt-run)")

FIELDS: tuple[Field, ...] = (
    Field("metadata.name", "DNS label, <= 40 chars",
          "names the run folder, members (`NAME-m003`) and Jobs (`NAME-m003-s00005-a0`)"),
    Field("spec", "", "a population-based training: members, search space, exploit/explore strategy, budget, "
          "and the pod template each segment runs", row=False),
    Field("spec.population", "int >= 2, required", "number of members (immutable in Kubernetes)"),
    Field("spec.parallelism", "int >= 0, = population",
          "segments running at once; a larger population time-shares slots, least-progressed member first; "
          "`kubectl scale pbt/NAME --replicas=N`, an HPA or KEDA (the scale subresource's selector is "
          "`status.selector`); 0 pauses a training on a cluster (`pbt run` needs >= 1); scaling down withdraws "
          "only Jobs that have not started training; the one field `pbt run --resume` lets change (or "
          "`--parallelism N`)"),
    Field("spec.suspend", "bool, false",
          "Kubernetes: start no segment; Jobs not yet training are withdrawn; see `spec.segment.onSuspend`"),
    Field("spec.queueName", "LocalQueue name, none",
          "Kubernetes: every segment Job goes to this Kueue LocalQueue (label `kueue.x-k8s.io/queue-name`, "
          "created suspended: Kueue's admission starts it). See [autoscaling.md](autoscaling.md)"),
    Field("spec.jobMetadata", "`{labels: {}, annotations: {}}`",
          "Kubernetes: extra labels and annotations on every segment Job (not under `pbt.dev/`), e.g. a Kueue "
          "priority class"),
    Field("spec.jobMetadata.labels", "map", "labels for every segment Job", row=False),
    Field("spec.jobMetadata.annotations", "map", "annotations for every segment Job", row=False),
    Field("spec.mode", _alts(MODES), "decide each member when its segment ends, or at a generation barrier"),
    Field("spec.seed", "int >= 0, 0", "every random draw derives from (seed, member, segment)"),
    Field("spec.objective", "", "which reported number is the score, and whether higher is better", row=False),
    Field("spec.objective.metric", "string, `score`",
          "which reported number is the score: the result's metric of that name; a result without one is "
          "ranked by its `score` (a worker may report `seg.report(score=val_acc)` under `metric: val_acc`), "
          "so check the name against what the worker reports"),
    Field("spec.objective.direction", _alts(DIRECTIONS), "`min` for losses"),
    Field("spec.segment", "", "one segment: train for a bit from a checkpoint, then save and report", row=False),
    Field("spec.segment.steps", "int >= 1, 1", "steps per segment (`steps.budget` in the contract)"),
    Field("spec.segment.timeoutSeconds", "int >= 1, none",
          "a segment training longer is stopped and counts as failed (`DeadlineExceeded`); in Kubernetes it counts "
          "from the trainer container's start, never the time spent waiting for a queue, a node or an image"),
    Field("spec.segment.pendingTimeoutSeconds", "int >= 1, none",
          "Kubernetes: an admitted segment whose trainer has not started after this long fails "
          "(`PendingTimeout`, with the reason it waited)"),
    Field("spec.segment.onSuspend", _alts(ON_SUSPEND),
          "under `spec.suspend`: segments already training finish, or are stopped and rerun from the same "
          "checkpoint on resume"),
    Field("spec.segment.protectFromDisruption", "bool, true",
          "Kubernetes: segment pods carry `karpenter.sh/do-not-disrupt: \"true\"` and "
          "`cluster-autoscaler.kubernetes.io/safe-to-evict: \"false\"` (the template's own annotations win)"),
    Field("spec.budget", "", "when the training ends", row=False),
    Field("spec.budget.segments", "int >= 1, 10", "segments per member"),
    Field("spec.budget.targetScore", "number, none", "the training finishes when any member reaches it"),
    Field("spec.budget.patience", "int >= 1, none",
          "finish when the best score has not improved for patience x population segments"),
    Field("spec.hyperparameters", "map, required", "the search space: hyperparameter name -> definition",
          row=False),
    Field("spec.hyperparameters.NAME", "see below, required", "the search space (immutable in Kubernetes)"),
    Field("spec.hyperparameters.NAME.type", _alts(PARAM_KINDS), "with `min`, `max`, `log` (numbers) or `choices`"),
    Field("spec.hyperparameters.NAME.min", "number", "lower bound (float and int)", row=False),
    Field("spec.hyperparameters.NAME.max", "number", "upper bound, > min (float and int)", row=False),
    Field("spec.hyperparameters.NAME.log", "bool, false", "sample and perturb on a log scale (min > 0)", row=False),
    Field("spec.hyperparameters.NAME.choices", "list", "the values of a categorical: strings, numbers, or true and false (not mixed with the others)", row=False),
    Field("spec.hyperparameters.NAME.initial", "value or {min, max} or {choices}",
          "the first value, or a narrower range or subset to draw the first values from", row=False),
    Field("spec.exploit", "", "how poor members copy better ones", row=False),
    Field("spec.exploit.strategy", _alts(EXPLOIT_STRATEGIES), "`none`: members train alone (a random-search baseline)"),
    Field("spec.exploit.fraction", "(0, 1) and at most 1 - `donorFraction`, 0.25 (with `explore.strategy: pb2`: 0.75 below 8 members, else 0.5; with more than 20 segments at most 15 / `budget.segments`, never below 0.25)",
          "truncation: the bottom fraction copies a member of the top fraction; PB2 picks hyperparameters "
          "only for members that copy, so its default is larger (README: \"Choosing PB2 settings\")"),
    Field("spec.exploit.donorFraction", "(0, 0.5], `fraction` (at most 0.25 with `explore.strategy: pb2`)",
          "truncation: the top fraction whose members are copied; with PB2 more of the population re-decides, but "
          "copies only the best quarter's checkpoints (README: \"Choosing PB2 settings\")"),
    Field("spec.exploit.size", "int >= 2, 2", "tournament size: the loser copies the winner"),
    Field("spec.exploit.significance", "`{enabled: false, alpha: 0.05, window: 4}`",
          "only copy when Welch's t-test over the last `window` scores says the donor is better"),
    Field("spec.exploit.significance.enabled", "bool, false", "test before copying", row=False),
    Field("spec.exploit.significance.alpha", "(0, 1), 0.05", "the test's significance level", row=False),
    Field("spec.exploit.significance.window", "int >= 2, 4", "how many recent scores per member the test uses",
          row=False),
    Field("spec.explore", "", "how the copied hyperparameters change", row=False),
    Field("spec.explore.strategy", _alts(EXPLORE_STRATEGIES), "how the copied hyperparameters change"),
    Field("spec.explore.factors", "list of positive numbers, [0.8, 1.2]",
          "perturbation factors (log-scale aware; ints always move; categoricals go to a neighbouring choice)"),
    Field("spec.explore.resampleProbability", "[0, 1], 0.25",
          "per hyperparameter, draw from the prior instead of perturbing"),
    Field("spec.explore.crossover", "bool, false", "the child takes each hyperparameter from one of two good parents"),
    Field("spec.explore.pb2", "`{parallel: liar-pessimistic, window, maxRows: 128, minRows, candidates: 128, restarts: 2, "
          "kappa: 1, trustRegion: 0.25, retune}`", "PB2's settings"),
    Field("spec.explore.pb2.parallel", _alts(PB2_PARALLEL),
          "how PB2 accounts for segments decided but not finished (README: \"Choosing PB2 settings\")"),
    Field("spec.explore.pb2.window", "int >= 1, none", "only rows within this many steps of the newest are used",
          row=False),
    Field("spec.explore.pb2.maxRows", "int >= 8, 128", "the GP's largest number of rows (older ones subsampled)",
          row=False),
    Field("spec.explore.pb2.minRows", "int >= 2, 2 x (numeric hyperparameters + categorical choices), within [4, 32], and at most a tenth of population x budget.segments (at least 2)",
          "below this many rows PB2 perturbs instead; at most maxRows", row=False),
    Field("spec.explore.pb2.candidates", "int >= 1, 128", "random candidates scored by the acquisition", row=False),
    Field("spec.explore.pb2.restarts", "int >= 0, 2", "L-BFGS-B starts from the best candidates", row=False),
    Field("spec.explore.pb2.kappa", "number >= 0, 1", "UCB exploration weight", row=False),
    Field("spec.explore.pb2.trustRegion", "(0, 1], 0.25",
          "how far a new configuration may move from the donor's, as a share of each numeric range (log scale "
          "where log: true), whether or not its categories change; 1 searches everywhere"),
    Field("spec.explore.pb2.retune", "[0, 1], 0.05 (with more than 20 segments 1 / `budget.segments`)",
          "a member that keeps its weights moves its numbers to PB2's best predicted ones within this share of "
          "each numeric range of its own (categories kept; no exploration bonus); 0 keeps its configuration, as "
          "in PBT"),
    Field("spec.storage", "", "where checkpoints live", row=False),
    Field("spec.storage.uri", "`file://`, `s3://BUCKET/PREFIX`, `mem://`",
          "where checkpoints live; default `pbt-runs/NAME/checkpoints` locally; required in Kubernetes (`s3://`, "
          "or `file://` on a volume mounted in the template; not `mem://`), and immutable there: the members' "
          "checkpoints are under it"),
    Field("spec.storage.credentialsSecret", "Secret name",
          "Kubernetes: AWS_* keys passed to segment pods by reference"),
    Field("spec.worker", "", "`pbt run` only (refused on a cluster, where segments run spec.template)", row=False),
    Field("spec.worker.executor", _alts(EXECUTORS),
          "`pbt run` only (refused on a cluster): the command in subprocesses (warm workers, see `warm`), or a Python "
          "function in this process"),
    Field("spec.worker.command", "list of strings", "process executor (default: the template container's command)"),
    Field("spec.worker.function", "`module:function`", "inline executor; the module is looked up next to the manifest"),
    Field("spec.worker.env", "map", "environment of the worker process", row=False),
    Field("spec.worker.workingDir", "path", "folder of the worker process (relative to the manifest)", row=False),
    Field("spec.worker.env, workingDir", "", "environment (a map, or a container's `[{name, value}]` list), "
          "folder (relative to the manifest). An inline function in threads gets `env` in its segments' storage "
          "settings (`seg.save`/`seg.restore`: the S3 endpoint, credentials, `PBT_S3_*`, `PBT_WORKER_TMPDIR`), "
          "not in `os.environ`, which this process's other threads share; in `pool: processes` each child has it "
          "in `os.environ`"),
    Field("spec.worker.pool", _alts(INLINE_POOLS), "inline executor: run the function in threads or in worker processes"),
    Field("spec.worker.warm", "bool, true", WARM),
    Field("spec.template", "PodTemplateSpec, required in Kubernetes",
          "Kubernetes: the segment pod, kept as written (GPU requests, tolerations, node selectors). With sidecars "
          "(native ones in `initContainers` with `restartPolicy: Always`, or classic second containers), name the "
          "trainer with the annotation `kubectl.kubernetes.io/default-container: <name>` in "
          "`spec.template.metadata.annotations` (default: the first container): it gets `PBT_SEGMENT`, its "
          "termination message is the segment's result (never another container's), and `kubectl logs` shows it. "
          "A read-only root filesystem is fine: without a writable temp directory the worker SDK buffers "
          "checkpoints in memory (mount an `emptyDir` at `/tmp` for large ones)"),
    Field("spec.failurePolicy", "", "what happens when a segment fails", row=False),
    Field("spec.failurePolicy.maxRetries", "int >= 0, 2", "retries per segment; a segment that diverged (a NaN or infinite score) is not retried as it was: its next attempt copies the best member's checkpoint and explores from there, as an exploit does; a result without the objective's metric is not retried (the worker's code or `objective.metric`, never chance), nor is a failure the worker calls permanent (a `pbt_worker.PermanentError`, or a contract its SDK refuses: an image older than the operator): either fails the training at once, and `pbt run --resume` after the fix goes on"),
    Field("spec.failurePolicy.onExhausted", _alts(ON_EXHAUSTED),
          "then the member becomes an exact copy of the best member, checkpoint and hyperparameters "
          "(`replace`; if the copy fails as often, the training fails), or the training fails"),
    Field("spec.failurePolicy.maxDisruptions", "int >= 0, 5",
          "Kubernetes: reruns after a preemption, eviction or node loss per attempt (not failures); one more "
          "fails the attempt (`TooManyDisruptions`)"),
)

# The CRDs' other fields (status, PopulationMember): descriptions only, not manifest rows.
STATUS_FIELDS: dict[str, str] = {
    "status": "What the operator observed: phase, conditions, counts, the best member and, once finished, its "
              "hyperparameter schedule.",
    "status.conditions": "Ready, Progressing, Succeeded, Failed, SegmentsStarted and JobsAccepted, per the "
                         "Kubernetes API conventions.",
    "status.observedGeneration": "The spec generation the status describes.",
    "status.running": "Segment Jobs running now (training, or just created).",
    "status.waiting": "Segment Jobs created but waiting to train: for a queue's admission, a node, the scheduler, "
                      "an image (each member's status.waiting says why).",
    "status.selector": "The label selector of the training's segment pods (the scale subresource's selector).",
    "status.queued": "Members waiting for a slot (spec.parallelism).",
}
MEMBER_FIELDS: dict[str, str] = {
    "spec": "One member of a PopulationTraining; written by the operator, not by users.",
    "spec.training": "The PopulationTraining this member belongs to.",
    "spec.index": "The member's number in its population.",
    "spec.segment": "The decided next segment: hyperparameters, checkpoint to restore, steps, attempt.",
    "status": ("The member's current phase, score and hyperparameters, and its newest finished segments (history: a "
               "bounded window; every segment's full record is in storage under <storage>/<training>/records/)."),
    "status.conditions": "Conditions per the Kubernetes API conventions.",
}
CONDITION_FIELDS: dict[str, str] = {
    "type": "Condition type (Ready, Progressing, Succeeded, Failed, SegmentsStarted, JobsAccepted).",
    "status": "True, False or Unknown.",
    "reason": "A CamelCase reason (the constants in pbt_operator/kube/conditions.py).",
    "message": "Human-readable detail; for refusals, the API server's own message.",
    "lastTransitionTime": "When status last changed.",
    "observedGeneration": "The spec generation this condition describes.",
}


def crd_description(path: str) -> str | None:
    """A CRD property's description; `path` as in FIELDS (map values as NAME)."""
    for f in FIELDS:
        if f.path == path:
            text = f.meaning[0].upper() + f.meaning[1:] + (f" ({f.kind})" if f.kind else "")
            return text.replace("\\|", "|")
    return STATUS_FIELDS.get(path)


BEGIN = "<!-- fields: generated by `python -m pbt_operator.fielddocs --write docs/manifest.md` -->"
END = "<!-- end of fields -->"


def table() -> str:
    lines = ["| field | type, default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        if f.row:
            path = f"`{f.path}`" if "," not in f.path else "`" + f.path.replace(", ", "`, `") + "`"
            lines.append(f"| {path} | {f.kind} | {f.meaning} |")
    return "\n".join(lines)


def render_doc(text: str) -> str:
    """`text` (docs/manifest.md) with the table between the markers replaced."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"docs/manifest.md has no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{table()}\n{END}", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", type=Path, help="rewrite the table in this markdown file")
    args = ap.parse_args(argv)
    if args.write:
        args.write.write_text(render_doc(args.write.read_text()))
    else:
        sys.stdout.write(table() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
