"""Mutation testing of one module at a time with mutmut, and the score table of all runs.

    .venv/bin/python -m tools.mutation run engine [--max-children 2]
    .venv/bin/python -m tools.mutation run core          # engine, motion, attention, runner
    .venv/bin/python -m tools.mutation report            # scores of every module run so far
    .venv/bin/python -m tools.mutation survivors engine  # the surviving mutants' diffs

mutmut reads one configuration (``[tool.mutmut]`` in pyproject.toml) and keeps its results in
``mutants/`` beside it. Each module here runs in its own copy of the repository,
``.mutation/MODULE/`` (ignored by git), whose pyproject mutates only that module and selects
only the test modules that exercise it: a mutant then runs the few tests that cover the
mutated function (mutmut's own per-function selection) out of a small, warm set instead of the
whole suite, and results stay per module, so a re-run after a change retests only the
functions that changed. The add-on's modules run their tests in headless Blender (bpy).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
BACKEND_ARGS = ("--ignore=tests/addon", "-p", "no:cacheprovider")
ADDON_ARGS = ("-p", "no:cacheprovider")


@dataclass(frozen=True)
class Scope:
    """One module to mutate and the test modules that exercise it."""

    source: str  # the file to mutate
    tests: tuple[str, ...]  # test modules run for its mutants (mutmut narrows per function)

    @property
    def addon(self) -> bool:
        return self.source.startswith("blender_t2vz/")


SCOPES: dict[str, Scope] = {
    "engine": Scope(
        "backend/engine.py",
        (
            "tests/test_engine.py",
            "tests/test_runner.py",
            "tests/test_quality.py",
            "tests/test_motion.py",
            "tests/test_attention.py",
        ),
    ),
    "motion": Scope("backend/motion.py", ("tests/test_motion.py", "tests/test_engine.py")),
    "attention": Scope("backend/attention.py", ("tests/test_attention.py", "tests/test_engine.py")),
    "runner": Scope(
        "backend/runner.py",
        ("tests/test_runner.py", "tests/test_worker.py", "tests/test_cli.py"),
    ),
    "worker": Scope("backend/worker.py", ("tests/test_worker.py",)),
    "protocol": Scope(
        "backend/protocol.py",
        ("tests/test_protocol.py", "tests/test_runner.py", "tests/test_cli.py"),
    ),
    "controls": Scope("backend/controls.py", ("tests/test_controls.py", "tests/test_runner.py")),
    "video_io": Scope("backend/video_io.py", ("tests/test_video_io.py", "tests/test_runner.py")),
    "jobs": Scope("blender_t2vz/jobs.py", ("tests/addon/test_jobs.py",)),
    "strips": Scope(
        "blender_t2vz/strips.py", ("tests/addon/test_jobs.py", "tests/addon/test_roundtrip.py")
    ),
    "worker_client": Scope("blender_t2vz/worker_client.py", ("tests/addon/test_worker_client.py",)),
    "runtime": Scope(
        "blender_t2vz/runtime.py",
        ("tests/addon/test_runtime.py", "tests/addon/test_roundtrip.py"),
    ),
}
GROUPS = {
    "core": ("engine", "motion", "attention", "runner"),
    "backend": (
        "engine",
        "motion",
        "attention",
        "runner",
        "worker",
        "protocol",
        "controls",
        "video_io",
    ),
    "addon": ("jobs", "strips", "worker_client", "runtime"),
}
GROUPS["all"] = GROUPS["backend"] + GROUPS["addon"]

# mutmut's exit-code verdicts (mutmut.stats.status_by_exit_code), as counted here.
KILLED = {1, 3, 36, 24, -24, 152, 255, 37}  # failed tests, timeouts, type-check catches
SURVIVED = {0}
NO_TESTS = {5, 33}


def expand(names: list[str]) -> list[str]:
    """Module names with groups (core, backend, addon, all) expanded; unknown names raise."""
    out: list[str] = []
    for name in names:
        if name in GROUPS:
            out += [n for n in GROUPS[name] if n not in out]
        elif name in SCOPES:
            if name not in out:
                out.append(name)
        else:
            known = ", ".join([*SCOPES, *GROUPS])
            raise ValueError(f"unknown module {name!r}; known: {known}")
    return out


def mutmut_config(scope: Scope) -> str:
    """The ``[tool.mutmut]`` section of one module's run."""
    source_dir = scope.source.split("/")[0] + "/"
    extra = ADDON_ARGS if scope.addon else BACKEND_ARGS
    copy = [
        "backend/",
        "bench/",
        "blender_t2vz/",
        "tools/",
        "install_deps.py",
        "build_extension.py",
        "blender_manifest.toml",
    ]
    also_copy = [c for c in copy if c != source_dir]
    return (
        "[tool.mutmut]\n"
        f"source_paths = {json.dumps([source_dir])}\n"
        f"only_mutate = {json.dumps([scope.source])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(list(scope.tests))}\n"
        f"pytest_add_cli_args = {json.dumps(list(extra))}\n"
        f"also_copy = {json.dumps(also_copy)}\n"
    )


def with_config(pyproject: str, section: str) -> str:
    """pyproject text with its ``[tool.mutmut]`` table replaced by ``section``."""
    stripped = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", pyproject).rstrip()
    return f"{stripped}\n\n{section}"


def repo_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the checkout (what a commit would hold)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def prepare(name: str) -> Path:
    """Sync the checkout into ``.mutation/NAME`` (keeping mutmut's results) with its config."""
    scope = SCOPES[name]
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    wanted = set(repo_files())
    for path in work.rglob("*"):  # files deleted from the checkout since the last run
        rel = path.relative_to(work).as_posix()
        if path.is_file() and not rel.startswith("mutants/") and rel not in wanted:
            path.unlink()
    for rel in wanted:
        src, dst = ROOT / rel, work / rel
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    pyproject = work / "pyproject.toml"
    pyproject.write_text(with_config(pyproject.read_text(), mutmut_config(scope)))
    return work


def mutmut() -> str:
    """The mutmut executable of this interpreter's environment."""
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.is_file():
        raise SystemExit(
            f"mutmut is not installed beside {sys.executable}: "
            f"{sys.executable} -m pip install mutmut==3.8.1"
        )
    return str(exe)


def run(names: list[str], max_children: int) -> int:
    """mutmut run for each module, one after the other; the last non-zero exit status."""
    status = 0
    for name in names:
        work = prepare(name)
        print(f"== {name}: mutmut run in {work}", flush=True)
        code = subprocess.call([mutmut(), "run", "--max-children", str(max_children)], cwd=work)
        status = code or status
    return status


def verdicts(name: str) -> Counter:
    """Counts of killed / survived / no tests / other over one module's mutants."""
    scope = SCOPES[name]
    meta = WORK / name / "mutants" / f"{scope.source}.meta"
    counts: Counter = Counter()
    if not meta.is_file():
        return counts
    for code in json.loads(meta.read_text())["exit_code_by_key"].values():
        if code in KILLED:
            counts["killed"] += 1
        elif code in SURVIVED:
            counts["survived"] += 1
        elif code in NO_TESTS:
            counts["no tests"] += 1
        elif code is None:
            counts["not run"] += 1
        else:
            counts["other"] += 1
    return counts


def score(counts: Counter) -> float | None:
    """Killed share of the mutants that ran (no-tests mutants count as survivors)."""
    tested = counts["killed"] + counts["survived"] + counts["no tests"] + counts["other"]
    return counts["killed"] / tested if tested else None


def report(names: list[str]) -> str:
    """A Markdown table of every module's verdicts and score, and the overall score."""
    lines = [
        "| module | mutants | killed | survived | no tests | score |",
        "|---|---|---|---|---|---|",
    ]
    total: Counter = Counter()
    for name in names:
        counts = verdicts(name)
        if not counts:
            lines.append(f"| `{SCOPES[name].source}` | not run | | | | |")
            continue
        total += counts
        value = score(counts)
        lines.append(
            f"| `{SCOPES[name].source}` | {sum(counts.values())} | {counts['killed']} | "
            f"{counts['survived']} | {counts['no tests']} | "
            f"{'-' if value is None else f'{value:.0%}'} |"
        )
    overall = score(total)
    if overall is not None:
        lines.append(
            f"| **overall** | {sum(total.values())} | {total['killed']} | {total['survived']} | "
            f"{total['no tests']} | **{overall:.0%}** |"
        )
    return "\n".join(lines)


def survivors(name: str) -> int:
    """Print the diff of each surviving (or untested) mutant of one module."""
    work = WORK / name
    meta = work / "mutants" / f"{SCOPES[name].source}.meta"
    if not meta.is_file():
        raise SystemExit(f"{name} has not been run: python -m tools.mutation run {name}")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    for key, code in codes.items():
        if code in SURVIVED or code in NO_TESTS:
            print(f"# {key} ({'survived' if code in SURVIVED else 'no tests'})", flush=True)
            subprocess.call([mutmut(), "show", key], cwd=work)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: run, report, survivors."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.mutation", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="mutate and test the named modules (or groups)")
    p_run.add_argument("modules", nargs="+", metavar="MODULE")
    p_run.add_argument("--max-children", type=int, default=2, help="parallel mutants")
    p_report = sub.add_parser("report", help="score table of the runs so far")
    p_report.add_argument("modules", nargs="*", metavar="MODULE", default=["all"])
    p_surv = sub.add_parser("survivors", help="diffs of one module's surviving mutants")
    p_surv.add_argument("module", choices=list(SCOPES))
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            if args.max_children < 1:
                parser.error(f"--max-children must be at least 1, got {args.max_children}")
            return run(expand(args.modules), args.max_children)
        if args.command == "report":
            print(report(expand(args.modules)))
            return 0
        return survivors(args.module)
    except ValueError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
