"""Mutation testing of one module at a time with mutmut, and the score table of all runs.

    .venv/bin/python -m tools.mutation run engine [--max-children 2]
    .venv/bin/python -m tools.mutation run core          # engine, motion, attention, runner
    .venv/bin/python -m tools.mutation report            # scores of every module run so far
    .venv/bin/python -m tools.mutation survivors engine  # the surviving mutants' diffs
    .venv/bin/python -m tools.mutation run engine --sample 120   # a seeded random sample

mutmut reads one configuration (``[tool.mutmut]`` in pyproject.toml) and keeps its results in
``mutants/`` beside it. Each module here runs in its own copy of the repository,
``.mutation/MODULE/`` (ignored by git), whose pyproject mutates only that module and selects
only the test modules that exercise it: a mutant then runs the few tests that cover the
mutated function (mutmut's own per-function selection) out of a small, warm set instead of the
whole suite, and results stay per module, so a re-run after a change retests only the
functions that changed. The add-on's modules run their tests in headless Blender (bpy).

``--sample N`` tests a seeded random sample of the module's mutants (kept in
``.mutation/MODULE/sample.json``; mutants tested before count without running again), and
the report gives the sample's score with a 95 % interval: on 2 cores a surviving mutant of
the generation loop costs a minute (every engine test that reaches it), so the whole
module takes hours while a sample of 100 gives the score within about +-8 points
(mutant sampling: Wong and Mathur 1995).
"""

from __future__ import annotations

import argparse
import json
import math
import random
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
ADDON_TIMEOUT_CONSTANT = 20.0  # seconds; see mutmut_config


@dataclass(frozen=True)
class Scope:
    """One module to mutate and the test modules that exercise it."""

    source: str  # the file to mutate
    tests: tuple[str, ...]  # test modules run for its mutants (mutmut narrows per function)

    @property
    def addon(self) -> bool:
        return self.source.startswith("blender_t2vz/")


SCOPES: dict[str, Scope] = {
    # The engine's own tests, and the picture tests on the shapes models (test_runner reaches
    # the engine only through whole jobs: a third of the time of a surviving mutant).
    "engine": Scope(
        "backend/engine/pipeline.py",
        (
            "tests/test_engine.py",
            "tests/test_quality.py",
            "tests/test_motion.py",
            "tests/test_attention.py",
        ),
    ),
    "motion": Scope("backend/engine/motion.py", ("tests/test_motion.py", "tests/test_engine.py")),
    "attention": Scope(
        "backend/engine/attention.py", ("tests/test_attention.py", "tests/test_engine.py")
    ),
    "runner": Scope(
        "backend/service/runner.py",
        ("tests/test_runner.py", "tests/test_worker.py", "tests/test_adapters.py"),
    ),
    "worker": Scope("backend/service/worker.py", ("tests/test_worker.py",)),
    # Not test_cli.py: its signal tests (Ctrl-C, a closed terminal) time subprocesses and
    # failed mutmut's clean run on a loaded machine.
    "protocol": Scope("backend/protocol.py", ("tests/test_protocol.py", "tests/test_runner.py")),
    "controls": Scope(
        "backend/media/controls.py", ("tests/test_controls.py", "tests/test_runner.py")
    ),
    "video_io": Scope(
        "backend/media/video_io.py", ("tests/test_video_io.py", "tests/test_runner.py")
    ),
    "jobs": Scope("blender_t2vz/jobs.py", ("tests/addon/test_jobs.py",)),
    # Not test_roundtrip.py (a real backend: minutes per mutant) nor test_movie_frames.py
    # (renders movies); test_strips.py and test_runtime.py check the same rules on their own.
    "strips": Scope(
        "blender_t2vz/strips.py", ("tests/addon/test_strips.py", "tests/addon/test_jobs.py")
    ),
    "worker_client": Scope("blender_t2vz/worker_client.py", ("tests/addon/test_worker_client.py",)),
    "runtime": Scope("blender_t2vz/runtime.py", ("tests/addon/test_runtime.py",)),
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
    # mutmut's wall-clock limit is (covering tests' time + timeout_constant) x 15. An add-on
    # mutant's pytest run also collects its test modules in headless Blender, which the test
    # times leave out: with mutmut's 1 s constant, mutants of functions covered by fast tests
    # were stopped as "timeouts" on a busy machine though their tests would have passed.
    # Add-on mutants fork from a fork server that only collected the tests, not from mutmut's
    # main process: that one ran the tests, and a movie decoded there left FFmpeg's scaler
    # threads behind, which a forked child waits for forever (survivors read as timeouts).
    addon = (
        f'timeout_constant = {ADDON_TIMEOUT_CONSTANT}\nprocess_isolation = "forkserver"\n'
        if scope.addon
        else ""
    )
    return (
        "[tool.mutmut]\n"
        f"source_paths = {json.dumps([source_dir])}\n"
        f"only_mutate = {json.dumps([scope.source])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(list(scope.tests))}\n"
        f"pytest_add_cli_args = {json.dumps(list(extra))}\n"
        f"also_copy = {json.dumps(also_copy)}\n"
        f"{addon}"
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
        ours = rel.startswith("mutants/") or rel == "sample.json"
        if path.is_file() and not ours and rel not in wanted:
            path.unlink()
    for rel in wanted:
        src = ROOT / rel
        # mutmut refreshes its copies of Python files in mutants/ but not of other files
        # (model weights, configs): those are mirrored here too.
        targets = [work / rel]
        if not rel.endswith(".py") and (work / "mutants" / rel).parent.is_dir():
            targets.append(work / "mutants" / rel)
        for dst in targets:
            if not (dst.is_file() and dst.read_bytes() == src.read_bytes()):
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


def meta_path(name: str) -> Path:
    """mutmut's verdicts of one module's mutants (written when it generates them)."""
    return WORK / name / "mutants" / f"{SCOPES[name].source}.meta"


def mutant_codes(name: str) -> dict[str, int | None]:
    """Mutant name -> mutmut's exit code (None: not run yet); empty before generation."""
    meta = meta_path(name)
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}


def draw_sample(name: str, size: int, seed: int) -> list[str]:
    """A seeded random sample of the module's mutants, saved beside its results."""
    names = sorted(mutant_codes(name))
    chosen = sorted(random.Random(seed).sample(names, min(size, len(names))))
    (WORK / name / "sample.json").write_text(json.dumps({"seed": seed, "mutants": chosen}))
    return chosen


def surviving(name: str) -> list[str]:
    """The module's mutants that survived or had no tests (of its sample, if sampled)."""
    chosen = sampled(name)
    return sorted(
        key
        for key, code in mutant_codes(name).items()
        if (code in SURVIVED or code in NO_TESTS) and (chosen is None or key in chosen)
    )


def run(
    names: list[str], max_children: int, sample: int = 0, seed: int = 0, retest: bool = False
) -> int:
    """mutmut run for each module, one after the other; the last non-zero exit status.

    ``retest``: only the mutants that survived before (after new tests: mutmut keeps a
    verdict until a mutant is named again)."""
    status = 0
    for name in names:
        work = prepare(name)
        command = [mutmut(), "run", "--max-children", str(max_children)]
        if retest:
            again = surviving(name)
            if not again:
                print(f"== {name}: no survivors to retest", flush=True)
                continue
            command += again
        elif sample:
            if not mutant_codes(name):
                # mutmut generates every mutant before it filters by name: a name that
                # matches nothing generates them (and stops there, with an error we expect).
                subprocess.call([*command, "no.such.mutant"], cwd=work)
            codes = mutant_codes(name)
            # mutmut reruns every mutant it is given by name: give only those without a
            # verdict (a rerun of the same sample resumes it; new tests: --survivors).
            pending = [m for m in draw_sample(name, sample, seed) if codes.get(m) is None]
            if not pending:
                print(f"== {name}: every mutant of the sample has a verdict", flush=True)
                continue
            command += pending
        print(f"== {name}: mutmut run in {work}", flush=True)
        status = subprocess.call(command, cwd=work) or status
    return status


def sampled(name: str) -> list[str] | None:
    """The module's saved sample, or None when it was run whole."""
    path = WORK / name / "sample.json"
    return json.loads(path.read_text())["mutants"] if path.is_file() else None


def verdicts(name: str, only: list[str] | None = None) -> Counter:
    """Counts of killed / survived / no tests / other over one module's mutants (``only``:
    those names)."""
    codes = mutant_codes(name)
    counts: Counter = Counter()
    for key, code in codes.items():
        if only is not None and key not in only:
            continue
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


def interval(killed: int, tested: int) -> tuple[float, float]:
    """Wilson 95 % interval of a killed share (sound for small samples and shares near 1)."""
    if not tested:
        return 0.0, 1.0
    z, share = 1.96, killed / tested
    centre = (share + z * z / (2 * tested)) / (1 + z * z / tested)
    half = z * math.sqrt(share * (1 - share) / tested + z * z / (4 * tested * tested))
    return max(0.0, centre - half / (1 + z * z / tested)), min(
        1.0, centre + half / (1 + z * z / tested)
    )


def report(names: list[str]) -> str:
    """A Markdown table of every module's verdicts and score, and the overall score.

    A sampled module counts its sample only (its score has a 95 % interval); mutants that
    were not run do not count."""
    lines = [
        "| module | mutants | tested | killed | survived | no tests | score |",
        "|---|---|---|---|---|---|---|",
    ]
    total: Counter = Counter()
    for name in names:
        every = verdicts(name)
        if not every:
            lines.append(f"| `{SCOPES[name].source}` | not run | | | | | |")
            continue
        sample = sampled(name)
        counts = verdicts(name, sample) if sample is not None else every
        total += counts
        tested = sum(counts.values()) - counts["not run"]
        value = score(counts)
        shown = "-" if value is None else f"{value:.0%}"
        if sample is not None and value is not None:
            low, high = interval(counts["killed"], tested)
            shown += f" ({low:.0%}-{high:.0%})"
        what = f"{tested} (sample)" if sample is not None else str(tested)
        lines.append(
            f"| `{SCOPES[name].source}` | {sum(every.values())} | {what} | {counts['killed']} | "
            f"{counts['survived']} | {counts['no tests']} | {shown} |"
        )
    overall = score(total)
    if overall is not None:
        tested = sum(total.values()) - total["not run"]
        lines.append(
            f"| **overall** | | {tested} | {total['killed']} | {total['survived']} | "
            f"{total['no tests']} | **{overall:.0%}** |"
        )
    return "\n".join(lines)


def survivors(name: str) -> int:
    """Print the diff of each surviving (or untested) mutant of one module."""
    work = WORK / name
    codes = mutant_codes(name)
    if not codes:
        raise SystemExit(f"{name} has not been run: python -m tools.mutation run {name}")
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
    p_run.add_argument(
        "--sample", type=int, default=0, help="test a seeded random sample of this many mutants"
    )
    p_run.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p_run.add_argument(
        "--survivors", action="store_true", help="retest only the mutants that survived"
    )
    p_report = sub.add_parser("report", help="score table of the runs so far")
    p_report.add_argument("modules", nargs="*", metavar="MODULE", default=["all"])
    p_surv = sub.add_parser("survivors", help="diffs of one module's surviving mutants")
    p_surv.add_argument("module", choices=list(SCOPES))
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            if args.max_children < 1:
                parser.error(f"--max-children must be at least 1, got {args.max_children}")
            if args.sample < 0:
                parser.error(f"--sample must be positive, got {args.sample}")
            return run(
                expand(args.modules), args.max_children, args.sample, args.seed, args.survivors
            )
        if args.command == "report":
            print(report(expand(args.modules)))
            return 0
        return survivors(args.module)
    except ValueError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
