"""Epsilon or v-prediction (issue 20): the tensors of an SD 2.x single file cannot tell the
512 px epsilon model (2-1-base) from the 768 px v-prediction one (2-1). A job's
``prediction_type`` (--prediction-type) or the file's safetensors metadata picks the configs
repo and the scheduler's prediction type; job.json records what ran."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.models.loading import ModelCache, ModelLoadError, load_base_model
from backend.protocol import JobError, file_prediction_type, prediction_type_hint, validate_job
from backend.service.cli import build_parser, job_from_args
from backend.service.runner import run_job

SD21 = "stabilityai/stable-diffusion-2-1"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"


def test_metadata_hints_are_read_from_known_keys_only() -> None:
    assert prediction_type_hint({"modelspec.prediction_type": "v"}) == (
        "v_prediction",
        "modelspec.prediction_type",
    )
    assert prediction_type_hint({"modelspec.prediction_type": " Epsilon "})[0] == "epsilon"
    arch = {"modelspec.architecture": "stable-diffusion-v2-512"}
    assert prediction_type_hint(arch) == ("epsilon", "modelspec.architecture")
    v_arch = {"modelspec.architecture": "stable-diffusion-v2-768-v"}
    assert prediction_type_hint(v_arch)[0] == "v_prediction"
    assert prediction_type_hint({"parameterization": "eps"})[0] == "epsilon"
    # The most specific key wins; values outside a key's table are not guessed at.
    both = {"modelspec.prediction_type": "epsilon", **v_arch}
    assert prediction_type_hint(both)[0] == "epsilon"
    assert prediction_type_hint({"modelspec.prediction_type": "flow", **arch})[0] == "epsilon"
    assert prediction_type_hint({"modelspec.architecture": "stable-diffusion-xl-v1-base"}) is None
    assert prediction_type_hint({"modelspec.prediction_type": 1}) is None
    assert prediction_type_hint(None) is None


def test_the_job_field_is_checked_recorded_only_when_set_and_parsed_from_the_cli() -> None:
    base = {"prompt": "p", "out": "o"}
    with pytest.raises(
        JobError, match="prediction_type: must be one of epsilon, v_prediction, got 'v'"
    ):
        validate_job({**base, "prediction_type": "v"})
    with pytest.raises(JobError, match="prediction_type: expected str"):
        validate_job({**base, "prediction_type": 1})
    assert "prediction_type" not in validate_job(base).to_dict()  # jobs before it stay equal
    job = validate_job({**base, "prediction_type": "epsilon"})
    assert job.to_dict()["prediction_type"] == "epsilon"
    parsed = job_from_args(
        build_parser().parse_args(["generate", "--prediction-type", "v_prediction"])
    )
    assert parsed["prediction_type"] == "v_prediction"
    assert "prediction_type" not in job_from_args(build_parser().parse_args(["generate"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prediction-type", "v"])
    with pytest.raises(
        ModelLoadError, match="prediction_type must be one of epsilon, v_prediction, got 'v'"
    ):
        load_base_model("builtin:tiny", prediction_type="v")


def _with_metadata(source: Path, path: Path, metadata: dict[str, str]) -> Path:
    """``source`` re-saved with safetensors ``metadata``."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(source)), str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def sd2_file(tiny_family_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 2.x model as one original-format .safetensors file (no metadata)."""
    from ldm_export import export_family_checkpoint

    folder = tmp_path_factory.mktemp("sd2")
    return export_family_checkpoint(tiny_family_models["tiny-sd2"], folder / "sd2.safetensors")


def _config_repos(folder: Path) -> dict[str, dict[str, bytes]]:
    """Stand-ins for SD 2.1 (768 px, v) and 2.1-base (512 px, epsilon): the tiny SD 2.x
    folder's files, the base's with an epsilon scheduler and a smaller sample size."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    base = dict(files)
    scheduler = json.loads(files["scheduler/scheduler_config.json"])
    base["scheduler/scheduler_config.json"] = json.dumps(
        {**scheduler, "prediction_type": "epsilon"}
    ).encode()
    unet = json.loads(files["unet/config.json"])
    assert unet["sample_size"] != 4
    base["unet/config.json"] = json.dumps({**unet, "sample_size": 4}).encode()
    return {SD21: files, SD21_BASE: base}


def test_an_sd2_single_file_picks_its_configs_repo_by_prediction_type(
    tiny_family_models: dict, sd2_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No word: the 768 px v-prediction repo (diffusers' own default). The job's epsilon, or
    metadata saying epsilon: the 512 px repo. The job's word beats the metadata's."""
    from fakehub import FakeHub, use_in_process

    eps_file = _with_metadata(
        sd2_file, tmp_path / "eps.safetensors", {"modelspec.prediction_type": "epsilon"}
    )
    v_file = _with_metadata(
        sd2_file,
        tmp_path / "v.safetensors",
        {"modelspec.architecture": "stable-diffusion-v2-768-v"},
    )
    assert file_prediction_type(eps_file) == ("epsilon", "modelspec.prediction_type")
    assert file_prediction_type(sd2_file) is None
    repos = _config_repos(tiny_family_models["tiny-sd2"])
    cases = [
        (sd2_file, None, SD21, "v_prediction"),
        (sd2_file, "epsilon", SD21_BASE, "epsilon"),
        (eps_file, None, SD21_BASE, "epsilon"),
        (v_file, None, SD21, "v_prediction"),
        (v_file, "epsilon", SD21_BASE, "epsilon"),
        (eps_file, "v_prediction", SD21, "v_prediction"),
    ]
    with FakeHub(repos) as hub:
        use_in_process(hub, monkeypatch.setattr, tmp_path / "cache")
        for path, asked, repo, predicted in cases:
            base = load_base_model(str(path), prediction_type=asked)
            assert base.family.key == "sd2"
            assert base.scheduler_config["prediction_type"] == predicted, (path.name, asked)
            sample = json.loads(repos[repo]["unet/config.json"])["sample_size"]
            assert base.unet.config.sample_size == sample, (path.name, asked)
        sent = {name.split(":")[0] for name in hub.files_sent()}
    assert sent == {SD21, SD21_BASE}


def test_the_prediction_type_overrides_a_folders_scheduler(tiny_family_models: dict) -> None:
    folder = str(tiny_family_models["tiny-sd2"])
    assert load_base_model(folder).scheduler_config["prediction_type"] == "v_prediction"
    forced = load_base_model(folder, prediction_type="epsilon")
    assert forced.scheduler_config["prediction_type"] == "epsilon"


def _job(out: Path, **fields: Any):
    return validate_job(
        {
            "prompt": "a cat",
            "out": str(out),
            "model": "builtin:tiny-sd2",
            "frames": 2,
            "width": 64,
            "height": 64,
            "steps": 3,
            "device": "cpu",
            "dtype": "float32",
            "write_mp4": False,
            "save_latents": True,
            **fields,
        }
    )


def test_job_json_records_the_prediction_type_that_ran(
    tiny_family_models: dict, tmp_path: Path
) -> None:
    cache = ModelCache()
    run_job(_job(tmp_path / "own"), cache)
    run_job(_job(tmp_path / "eps", prediction_type="epsilon"), cache)
    own = json.loads((tmp_path / "own" / "job.json").read_text())
    eps = json.loads((tmp_path / "eps" / "job.json").read_text())
    assert own["prediction_type"] == "v_prediction"  # the model's scheduler config
    assert eps["prediction_type"] == "epsilon"
    # The override reaches the sampler: the same seed gives other latents.
    a, b = (np.load(tmp_path / name / "latents.npy") for name in ("own", "eps"))
    assert np.abs(a - b).mean() > 1e-4
    # job.json reruns as it ran.
    assert validate_job({**own, "out": str(tmp_path / "again")}).prediction_type == "v_prediction"
