"""backend/service/runner.py with SDXL and SD 2.x models: jobs end to end on the tiny models,
the family recorded in job.json and run.json, and ControlNets of another family refused
before any model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.models.loading import ModelCache, ModelLoadError
from backend.protocol import JobError, validate_job
from backend.service.runner import run_job


def make_job(out: Path, **fields: Any):
    data = {
        "prompt": "a cat",
        "out": str(out),
        "model": "builtin:tiny-xl",
        "frames": 3,
        "width": 64,
        "height": 64,
        "steps": 3,
        "device": "cpu",
        "dtype": "float32",
        "write_mp4": False,
        "save_latents": True,
        **fields,
    }
    return validate_job(data)


def write_video(folder: Path, frames: int = 3) -> str:
    """A folder of PNG frames, each a different random picture."""
    from backend.media.video_io import write_png

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(frames):
        write_png(folder / f"{i:04d}.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return str(folder)


@pytest.mark.parametrize(
    ("model", "family"), [("builtin:tiny-xl", "sdxl"), ("builtin:tiny-sd2", "sd2")]
)
def test_a_job_records_the_family_in_job_and_run_json(
    tmp_path: Path, tiny_family_models: dict, model: str, family: str
) -> None:
    result = run_job(make_job(tmp_path / "out", model=model), ModelCache())
    assert len(result.frames) == 3
    recorded = json.loads((tmp_path / "out" / "job.json").read_text())
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert recorded["family"] == family and run["family"] == family
    again = validate_job({**recorded, "out": str(tmp_path / "again")})  # job.json reruns
    assert again.family == family
    assert np.isfinite(np.load(tmp_path / "out" / "latents.npy")).all()


def test_a_job_made_for_another_family_is_refused(tmp_path: Path, tiny_family_models: dict) -> None:
    job = make_job(tmp_path / "out", model="builtin:tiny", family="sdxl")
    with pytest.raises(ModelLoadError, match=r"made for an sdxl model.*SD 1\.x"):
        run_job(job, ModelCache())
    assert not (tmp_path / "out").exists()
    with pytest.raises(JobError, match="family: must be one of sd1, sd2, sdxl"):
        make_job(tmp_path / "x", family="sd3")


def test_an_sdxl_controlnet_job_runs_and_another_familys_is_refused_before_loading(
    tmp_path: Path, tiny_models: dict, tiny_family_models: dict
) -> None:
    control = write_video(tmp_path / "control")
    spec = {"model": "builtin:tiny-xl-controlnet", "control": control, "weight": 0.8}
    result = run_job(
        make_job(tmp_path / "out", mode="controlnet", controlnets=[spec]), ModelCache()
    )
    assert len(result.frames) == 3
    cache = ModelCache()
    wrong = {"model": "builtin:tiny-controlnet", "control": control}
    with pytest.raises(
        ModelLoadError, match=r"builtin:tiny-controlnet.*SD 1\.x.*builtin:tiny-xl.*SDXL"
    ):
        run_job(make_job(tmp_path / "wrong", mode="controlnet", controlnets=[wrong]), cache)
    assert cache.loads == 0  # refused before anything loaded
    assert not (tmp_path / "wrong").exists()


def test_an_sdxl_pix2pix_job_follows_its_source(tmp_path: Path, tiny_family_models: dict) -> None:
    source = write_video(tmp_path / "source")
    run_job(
        make_job(tmp_path / "out", mode="pix2pix", model="builtin:tiny-xl-pix2pix", video=source),
        ModelCache(),
    )
    latents = np.load(tmp_path / "out" / "latents.npy")
    assert latents.shape == (3, 4, 8, 8)
    assert np.abs(latents[0] - latents[1]).mean() > 1e-3  # each frame its own source frame


def test_a_union_controlnet_job_takes_its_control_type_from_the_spec_or_detector(
    tmp_path: Path, tiny_family_models: dict
) -> None:
    control = write_video(tmp_path / "control")
    cache = ModelCache()

    def run(name: str, **spec: Any) -> np.ndarray:
        entry = {"model": "builtin:tiny-xl-union", "control": control, **spec}
        run_job(make_job(tmp_path / name, mode="controlnet", controlnets=[entry]), cache)
        recorded = json.loads((tmp_path / name / "job.json").read_text())
        assert recorded["controlnets"][0].get("control_type") == spec.get("control_type")
        return np.load(tmp_path / name / "latents.npy")

    depth, canny = run("depth", control_type="depth"), run("canny", control_type="canny")
    assert np.abs(depth - canny).mean() > 1e-4  # the type reaches the model
    with pytest.raises(ModelLoadError, match="give its control_type, one of openpose, depth"):
        run("none")
    with pytest.raises(ModelLoadError, match="knows 6 control types; 'tile' is number 6"):
        run("tile", control_type="tile")
    plain = {"model": "builtin:tiny-xl-controlnet", "control": control, "control_type": "depth"}
    with pytest.raises(ModelLoadError, match="not a union ControlNet"):
        run_job(make_job(tmp_path / "plain", mode="controlnet", controlnets=[plain]), cache)
    with pytest.raises(JobError, match=r"controlnets\[0\]\.control_type: must be one of"):
        make_job(tmp_path / "x", mode="controlnet", controlnets=[{**plain, "control_type": "x"}])
