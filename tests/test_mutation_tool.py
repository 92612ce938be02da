"""tools/mutation.py: scopes, the generated mutmut configuration, sampling and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import mutation

tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")


def test_groups_expand_in_order_without_repeats() -> None:
    assert mutation.expand(["core"]) == ["engine", "motion", "attention", "runner"]
    assert mutation.expand(["motion", "core"]) == ["motion", "engine", "attention", "runner"]
    assert set(mutation.expand(["all"])) == set(mutation.SCOPES)


def test_an_unknown_module_is_named() -> None:
    with pytest.raises(ValueError, match="unknown module 'engin'"):
        mutation.expand(["engin"])


def test_every_scope_names_files_that_exist() -> None:
    for scope in mutation.SCOPES.values():
        assert (mutation.ROOT / scope.source).is_file(), scope.source
        for test in scope.tests:
            assert (mutation.ROOT / test).is_file(), test


@pytest.mark.parametrize("name", ["engine", "jobs"])
def test_the_generated_config_replaces_the_committed_one(name: str) -> None:
    pyproject = (mutation.ROOT / "pyproject.toml").read_text()
    text = mutation.with_config(pyproject, mutation.mutmut_config(mutation.SCOPES[name]))
    config = tomllib.loads(text)
    assert text.count("[tool.mutmut]") == 1
    assert config["tool"]["ruff"] == tomllib.loads(pyproject)["tool"]["ruff"]  # the rest kept
    mut = config["tool"]["mutmut"]
    scope = mutation.SCOPES[name]
    assert mut["only_mutate"] == [scope.source]
    assert mut["pytest_add_cli_args_test_selection"] == list(scope.tests)
    assert mut["source_paths"] == [scope.source.split("/")[0] + "/"]
    assert mut["source_paths"][0] not in mut["also_copy"]
    # The backend's runs leave the add-on tests out; the add-on's run them.
    assert ("--ignore=tests/addon" in mut["pytest_add_cli_args"]) == (not scope.addon)


def write_meta(work: Path, codes: dict[str, int | None]) -> None:
    meta = work / "engine" / "mutants" / "backend" / "engine" / "pipeline.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes}))


def test_report_counts_verdicts_and_a_sample_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mutation, "WORK", tmp_path)
    # killed (failed test, timeout), survived, no tests, not run
    codes = {"m1": 1, "m2": 36, "m3": 0, "m4": 33, "m5": None, "m6": 1}
    write_meta(tmp_path, codes)
    row = mutation.report(["engine"]).splitlines()[2]
    # 5 tested (m5 not run); killed 3 (m1, m2, m6): 60 %; untested mutants count as survivors.
    assert row == "| `backend/engine/pipeline.py` | 6 | 5 | 3 | 1 | 1 | 60% |"
    assert mutation.surviving("engine") == ["m3", "m4"]  # what --survivors retests
    chosen = mutation.draw_sample("engine", 3, seed=7)
    assert chosen == mutation.draw_sample("engine", 3, seed=7)  # seeded
    assert len(set(chosen)) == 3 and set(chosen) <= set(codes)
    assert set(mutation.surviving("engine")) == {"m3", "m4"} & set(chosen)
    counts = mutation.verdicts("engine", chosen)
    row = mutation.report(["engine"]).splitlines()[2]
    tested = sum(counts.values()) - counts["not run"]
    assert f"| {tested} (sample) | {counts['killed']} |" in row


def test_wilson_interval_brackets_the_share() -> None:
    low, high = mutation.interval(85, 100)
    assert low < 0.85 < high
    assert (round(low, 3), round(high, 3)) == (0.767, 0.907)  # Wilson's formula by hand
    assert mutation.interval(10, 10)[1] == 1.0 and mutation.interval(0, 10)[0] == 0.0
