"""The Advanced panel's Prediction (issue 20): epsilon or v-prediction reaches the job,
Regenerate keeps a stored one unless the panel names another, and an SD 2.x single file's
native size follows it (512 px epsilon, 768 px v), as its metadata says when the panel
leaves it to the model."""

import json
from pathlib import Path

import bpy
import pytest
from test_panels import _draw

from blender_t2vz import jobs, operators, panels

SD2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"


def _sd2_file(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors header with an SD 2.x (OpenCLIP-H) tensor name and ``metadata``."""
    header: dict = {SD2_KEY: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = json.dumps(header).encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data + b"\0" * 4)
    return path


def test_the_prediction_type_reaches_the_job_and_regenerate_keeps_a_stored_one(scene) -> None:
    settings = scene.t2vz
    settings.prompt = "a cat"
    assert "prediction_type" in {e[1] for e in _draw(panels.T2VZ_PT_advanced)}
    assert "prediction_type" not in operators.plan_from_panel(bpy.context).job  # the model's
    settings.prediction_type = "epsilon"
    stored = operators.plan_from_panel(bpy.context).job
    assert stored["prediction_type"] == "epsilon"
    kept = jobs.rebuild_job(stored, {"prediction_type": None, "seed": 4}, out="/n")
    assert kept["prediction_type"] == "epsilon"
    changed = jobs.rebuild_job(stored, {"prediction_type": "v_prediction"}, out="/n")
    assert changed["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type: must be one of epsilon"):
        jobs.rebuild_job(stored, {"prediction_type": "v"}, out="/n")


def test_an_sd2_single_files_native_size_follows_its_prediction_type(scene, tmp_path: Path) -> None:
    settings = scene.t2vz
    plain = _sd2_file(tmp_path / "plain.safetensors")
    base = _sd2_file(
        tmp_path / "base.safetensors", {"modelspec.architecture": "stable-diffusion-v2-512"}
    )
    settings.model = str(plain)
    assert settings.native_side() == 768  # the 768 px v-prediction configs, as diffusers
    settings.prediction_type = "epsilon"
    assert settings.native_side() == 512
    settings.model = str(base)
    assert settings.native_side() == 512
    settings.prediction_type = "AUTO"
    assert settings.native_side() == 512  # its metadata says 512 px epsilon
    settings.prediction_type = "v_prediction"
    assert settings.native_side() == 768
    settings.model = "builtin:tiny"  # other models keep their own size
    settings.prediction_type = "epsilon"
    assert settings.native_side() == 64
