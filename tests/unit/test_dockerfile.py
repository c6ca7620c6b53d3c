"""The container images' recipes (no docker engine here: their structure is what can be checked).
Dockerfile: the operator image; examples/digits/Dockerfile: the digits example's worker image."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINNED = re.compile(r"^[\w.\-/]+:(?=[^:]*\d+\.\d+\.\d+)[\w.\-]+(@sha256:[0-9a-f]{64})?$")  # name:1.2[.3][-variant]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped; FROM lines with the
    defaults of the ARGs declared before the first FROM substituted (the base image is a build argument
    whose default is the real public image)."""
    out: list[tuple[str, str]] = []
    args: dict[str, str] = {}
    for word, rest in _raw_instructions(path):
        if word == "ARG" and not any(w == "FROM" for w, _ in out):
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
            continue
        if word == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        out.append((word, rest))
    return out


def _raw_instructions(path: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        buf += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(instrs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instrs:
        if ins[0] == "FROM":
            out.append([])
        assert out, f"{ins} before the first FROM"
        out[-1].append(ins)
    return out


def base_image(from_args: str) -> str:
    return shlex.split(from_args)[0]


def check_pinned(instrs: list[tuple[str, str]]) -> None:
    names = {shlex.split(a)[2].lower() for i, a in instrs if i == "FROM" and " as " in a.lower()}
    for i, a in instrs:
        if i == "FROM":
            image = base_image(a)
            if image.lower() in names:
                continue  # FROM an earlier stage
            # a version tag (written out, or as the default of the ARG it is substituted from)
            assert PINNED.match(image) and ":latest" not in image, f"base image not pinned by version: {image}"


def final_user(stage: list[tuple[str, str]]) -> str:
    users = [a for i, a in stage if i == "USER"]
    assert users, "the final stage sets no USER (runs as root)"
    return users[-1]


def check_non_root(user: str) -> None:
    name = user.split(":")[0]
    assert name not in ("root", "0", ""), f"USER {user} is root"
    assert name.isdigit(), f"USER {user}: numeric so that Kubernetes can verify runAsNonRoot"


# -- the operator image -----------------------------------------------------------------------------

def test_operator_image_is_multi_stage_and_pinned() -> None:
    instrs = instructions(ROOT / "Dockerfile")
    st = stages(instrs)
    assert len(st) >= 2, "multi-stage: build tools and caches stay out of the final image"
    check_pinned(instrs)
    for s in st:
        image = base_image(s[0][1])
        if image.startswith("python:"):
            assert re.match(r"python:3\.11\.\d+-slim-", image), image
    final = st[-1]
    assert any(i == "COPY" and "--from=" in a for i, a in final), "the final stage copies the build stage's result"
    assert not any(i == "RUN" and "pip install" in a for i, a in final), "no installs in the final stage"


def test_operator_image_installs_the_operator_extra_only() -> None:
    runs = " ".join(a for i, a in instructions(ROOT / "Dockerfile") if i == "RUN")
    extras = re.findall(r"\.\[([\w,\s-]+)\]", runs) + re.findall(r"pbt-operator\[([\w,\s-]+)\]", runs)
    assert extras == ["operator"], extras
    assert "operator" in PYPROJECT["project"]["optional-dependencies"]
    assert "torch" not in runs and "requirements" not in runs


def test_operator_image_runs_as_non_root_the_pbt_operator_command() -> None:
    instrs = instructions(ROOT / "Dockerfile")
    check_non_root(final_user(stages(instrs)[-1]))
    entry = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert entry, "no ENTRYPOINT"
    argv = json.loads(entry[-1])  # exec form: signals reach the operator, no shell in between
    assert argv == ["pbt", "operator"], argv
    scripts = PYPROJECT["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]} is not a console script in pyproject.toml {scripts}"
    assert scripts[argv[0]] == "pbt_operator.cli:main"
    cli = (ROOT / "operator" / "pbt_operator" / "cli.py").read_text()
    assert 'add_parser("operator"' in cli
    # the chart runs the same command (its Deployment sets it explicitly)
    deployment = (ROOT / "charts" / "pbt-operator" / "templates" / "deployment.yaml").read_text()
    assert 'command: ["pbt", "operator"]' in deployment
    env = " ".join(a for i, a in instrs if i == "ENV")
    assert "OPENBLAS_NUM_THREADS=1" in env and "PYTHONDONTWRITEBYTECODE=1" in env


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "pbt-runs", "tests"} <= ignored, ignored
    copied = " ".join(a for i, a in instructions(ROOT / "Dockerfile") if i == "COPY" and "--from" not in a)
    for src in ("pyproject.toml", "operator", "worker"):
        assert src in copied and src not in ignored
    # examples/digits/Dockerfile copies train.py from the same context
    assert "examples" not in ignored


# -- the digits worker image ------------------------------------------------------------------------

def test_digits_worker_image() -> None:
    path = ROOT / "examples" / "digits" / "Dockerfile"
    instrs = instructions(path)
    check_pinned(instrs)
    st = stages(instrs)
    assert base_image(st[0][0][1]).startswith("pytorch/pytorch:"), "a PyTorch base (torch comes with it)"
    check_non_root(final_user(st[-1]))
    runs = " ".join(a for i, a in instrs if i == "RUN")
    pips = re.findall(r"pip install ([^&]+)", runs)
    assert len(pips) == 1, pips
    pkgs = shlex.split(pips[0])
    assert sorted(p.split("==")[0] for p in pkgs if not p.startswith("-")) == [".[worker]", "scikit-learn"], pkgs
    assert "torch" not in pips[0] and "[operator]" not in runs and "[local]" not in runs
    assert "worker" in PYPROJECT["project"]["optional-dependencies"]
    copies = [a for i, a in instrs if i == "COPY"]
    assert any("examples/digits/train.py" in a and a.split()[-1] == "/app/train.py" for a in copies), copies
    manifest = (ROOT / "examples" / "digits" / "populationtraining.yaml").read_text()
    assert "/app/train.py" in manifest  # the Job's command runs the file the image copies


# -- the quadratic worker image (built and run by the real-node tests) ------------------------------

def test_quadratic_worker_image() -> None:
    instrs = instructions(ROOT / "examples" / "quadratic" / "Dockerfile")
    check_pinned(instrs)
    st = stages(instrs)
    assert re.match(r"python:3\.11\.\d+-slim-", base_image(st[0][0][1]))
    check_non_root(final_user(st[-1]))
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert ".[worker]" in runs and "[operator]" not in runs and "[local]" not in runs and "torch" not in runs
    cmd = json.loads([a for i, a in instrs if i == "CMD"][-1])
    copies = " ".join(a for i, a in instrs if i == "COPY")
    assert cmd[-1] == "/app/worker.py" and "examples/quadratic/worker.py" in copies


def test_base_images_are_build_arguments() -> None:
    """The tests build the images on a locally made stand-in base; the default stays the public image."""
    for path in (ROOT / "Dockerfile", ROOT / "examples" / "digits" / "Dockerfile",
                 ROOT / "examples" / "quadratic" / "Dockerfile"):
        raw = _raw_instructions(path)
        assert raw[0][0] == "ARG" and raw[0][1].startswith("BASE_IMAGE="), (path, raw[0])
        assert all(a.startswith("${BASE_IMAGE}") for i, a in raw if i == "FROM"), path
