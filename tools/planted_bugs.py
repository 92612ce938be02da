"""The five bugs issue 13 planted by hand, planted again: each must fail its test.

Each plant is one source edit that a plausible mistake would make, and the behavioural test
written to catch it. The check copies the repository's tracked files into a temporary
folder, runs the test there clean (it must pass) and with the plant (it must fail), so the
working tree is never touched:

    .venv/bin/python -m tools.planted_bugs            # all five, about a minute
    .venv/bin/python -m tools.planted_bugs --list     # what each plant changes
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plant:
    """One hand-planted bug: where, the exact text it replaces, and the test that sees it."""

    bug: str
    path: str
    old: str  # must occur exactly once in ``path``
    new: str
    test: str  # pytest node id


PLANTS = (
    Plant(
        "after the motion phase frame 1 restarts from x_t0 instead of x_t1",
        "backend/engine/pipeline.py",
        "latents = torch.cat([x_first_t1, x_first.expand(",
        "latents = torch.cat([x_first, x_first.expand(",
        "tests/test_engine.py::test_frame_one_of_a_motion_run_is_plain_ddim",
    ),
    Plant(
        "decode without dividing by the VAE's scaling factor",
        "backend/models/families.py",
        "    return latents / config.scaling_factor\n",
        "    return latents\n",
        "tests/test_engine.py::test_decode_matches_diffusers_decoding",
    ),
    Plant(
        "the runner's decode loop drops the last frame (nothing for a 1-frame job)",
        "backend/service/runner.py",
        "range(0, len(frame_ids), DECODE_SLICE)",
        "range(0, len(frame_ids) - 1, DECODE_SLICE)",
        "tests/test_runner.py::test_every_frame_is_written_and_is_its_decoded_latent",
    ),
    Plant(
        "cross-attention masks recorded from the negative-prompt branch",
        "backend/engine/pipeline.py",
        "CrossAttnMapRecorder((lat_h, lat_w), own_tokens, cond_branch)",
        "CrossAttnMapRecorder((lat_h, lat_w), own_tokens, 0)",
        "tests/test_engine.py::test_cross_attention_masks_come_from_the_prompt_branch",
    ),
    Plant(
        "the worker's stdout guard made a no-op",
        "backend/service/worker.py",
        "    sys.stdout.flush()\n    protocol_fd = os.dup(1)",
        "    return sys.stdout\n    protocol_fd = os.dup(1)",
        "tests/test_worker.py::test_stdout_guard_sends_stray_output_to_stderr",
    ),
)


def planted_source(plant: Plant, source: str) -> str:
    """``source`` with ``plant`` applied; ValueError unless its text occurs exactly once."""
    count = source.count(plant.old)
    if count != 1:
        raise ValueError(
            f"plant {plant.bug!r}: its text occurs {count} times in {plant.path}, not once "
            "(the code changed: update PLANTS)"
        )
    return source.replace(plant.old, plant.new)


def copy_repository(into: Path) -> None:
    """The tracked files of the repository (as in the working tree) under ``into``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def passes(copy: Path, test: str) -> bool:
    """Whether ``test`` passes in the copy."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
        cwd=copy,
        capture_output=True,
        text=True,
    )
    return run.returncode == 0


def check(plant: Plant, copy: Path) -> str:
    """'caught', or why not: the test fails without the plant, or passes with it."""
    path = copy / plant.path
    clean = path.read_text(encoding="utf-8")
    planted = planted_source(plant, clean)
    if not passes(copy, plant.test):
        return "test fails without the plant"
    path.write_text(planted, encoding="utf-8")
    try:
        caught = not passes(copy, plant.test)
    finally:
        path.write_text(clean, encoding="utf-8")
    return "caught" if caught else "NOT CAUGHT"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.planted_bugs", description=__doc__)
    parser.add_argument("--list", action="store_true", help="print the plants and stop")
    args = parser.parse_args(argv)
    if args.list:
        for plant in PLANTS:
            print(f"{plant.bug}\n  {plant.path}: {plant.old!r} -> {plant.new!r}\n  {plant.test}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="t2vz-plants-") as folder:
        copy = Path(folder)
        copy_repository(copy)
        for plant in PLANTS:
            verdict = check(plant, copy)
            failed += verdict != "caught"
            print(f"{verdict:>28}  {plant.bug}  ({plant.test.split('::')[1]})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
