"""bench.quality's flow section: its warp error, its statistics and the section end to end
on the tiny models (plumbing: the tiny models draw noise, not shapes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench import quality


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warp_error_is_zero_on_the_worlds_video_and_sees_wrong_motion(seed: int) -> None:
    """The world's own video warped by its true motion matches itself (measured below 1e-6
    Delta E, seeds 0-3); played backwards, its frames are elsewhere than the motion says
    (measured 1.8 to 6.1 Delta E)."""
    scene, velocity, video = quality.moving_source(seed, 8, 64)
    backward, _, visible = quality.true_flows(scene, velocity, 8, 64)
    assert all(v.mean() > 0.8 for v in visible)  # the edge band alone is left out
    de, mse = quality.warp_errors(video, backward, visible)
    assert de < 1e-3 and mse < 1e-9
    assert quality.warp_errors(video[::-1].copy(), backward, visible)[0] > 1.0


def test_reversed_flow_is_the_true_flow_negated() -> None:
    """The control row feeds the engine the true motion with its sign flipped."""
    scene, velocity, video = quality.moving_source(0, 4, 64)
    true = quality.flow_inputs("flow, true motion", scene, velocity, video, 8)["flow"]
    flipped = quality.flow_inputs(quality.FLOW_REVERSED, scene, velocity, video, 8)["flow"]
    assert quality.flow_inputs("paper", scene, velocity, video, 8) == {}
    assert set(true) == set(flipped) == {1, 2, 3}
    assert true[1][:2].abs().max() > 0.1  # the shape moves 2 px = 0.25 latent px a frame
    torch.testing.assert_close(flipped[1][:2], -true[1][:2])
    with pytest.raises(ValueError, match="'flow, upside down'"):
        quality.flow_inputs("flow, upside down", scene, velocity, video, 8)


def test_paired_difference_and_ratio_intervals() -> None:
    """Mean paired difference with its t-interval (t(0.975, 3) = 3.182), seeds with a NaN
    left out; ratio of means with an interval that a constant ratio pins; seeds above and
    below (ties and NaNs in neither)."""
    mean, low, high = quality.paired_difference([1, 2, 3, 4, 9], [0, 0, 0, 0, math.nan])
    half = 3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert mean == pytest.approx(2.5)
    assert (low, high) == pytest.approx((2.5 - half, 2.5 + half))
    assert math.isnan(quality.paired_difference([1.0], [0.0])[1])
    ratio, low, high = quality.ratio_interval([2, 4, 6], [1, 2, 3])
    assert (ratio, low, high) == pytest.approx((2, 2, 2))
    ratio, low, high = quality.ratio_interval([1, 4, 2, 3], [2, 2, 2, 2])
    assert ratio == pytest.approx(1.25)
    assert low < ratio < high
    assert quality.seeds_above([1, 2, 3, math.nan, 5], [2, 2, 2, 2, 1]) == (2, 1)


def test_flow_section_runs_on_the_tiny_models(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--sections flow`` end to end: the three judged configurations a mode, warp errors
    as ratios to the paper's, quality as paired differences, per-seed figures, sheets."""
    args = ["--tiny", "--sections", "flow", "--seeds", "2", "--steps", "2"]
    args += ["--json", str(tmp_path / "flow.json"), "--sheets", str(tmp_path / "sheets")]
    assert quality.main(args) == 0
    results = json.loads((tmp_path / "flow.json").read_text())
    rows = {(r["mode"], r["variant"]): r for r in results["flow"]}
    assert list(rows) == [(m, c) for m in quality.FLOW_MODES for c in quality.FLOW_CONFIGS]
    for mode in quality.FLOW_MODES:
        paper = rows[mode, "paper"]
        assert paper["warp_de_ratio"] == 1.0 and "silhouette_iou_diff" not in paper
        flow = rows[mode, "flow, true motion"]
        assert flow["warp_de"] != paper["warp_de"]  # the flow reached the engine
        assert flow["warp_de_ratio"] == pytest.approx(flow["warp_de"] / paper["warp_de"])
        for name in quality.FLOW_QUALITY[mode]:
            assert flow[f"{name}_diff_lo"] <= flow[f"{name}_diff"] <= flow[f"{name}_diff_hi"]
            assert flow[f"{name}_above"] + flow[f"{name}_below"] <= 2
        assert len(results["per_seed"]["flow"][f"{mode}, flow, estimated"]) == 2
        # Two seeds, each its source row and the three configurations: 8 rows of 64 + 2 px.
        sheet = cv2.imread(str(tmp_path / "sheets" / f"flow-{mode}.png"))
        assert sheet.shape[0] == 8 * 66
    printed = capsys.readouterr().out
    assert "controlnet, 2 seeds" in printed and "flow, estimated" in printed
    assert quality.FLOW_REVERSED not in printed


def test_flow_settings_refuses_the_judged_seeds() -> None:
    """Settings are chosen on held-out seeds only: a range touching 0..31 is refused."""
    from bench import flow_settings

    with pytest.raises(SystemExit) as caught:
        flow_settings.main(["--first-seed", "20", "--seeds", "16"])
    assert caught.value.code == 2
