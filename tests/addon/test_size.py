"""The job size: the model's native pixel count at the scene's aspect by default, the
scene's full size as an option with a warning, and result strips fitted to the frame."""

import json
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from conftest import write_png
from test_panels import Layout

from blender_t2vz import panels, sizing, strips

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize(
    ("aspect", "side", "size"),
    [
        ((1920, 1080), 512, (680, 384)),  # the 16:9 example
        ((1080, 1920), 512, (384, 680)),
        ((1, 1), 512, (512, 512)),
        ((2048, 858), 512, (792, 328)),  # 2.39:1 scope
        ((4, 3), 768, (888, 664)),
        # The tiny models: the short side at the 64 px minimum raises the long side with it
        # (issue 19: 88x64 before, a 1.375 aspect for a 16:9 scene).
        ((1920, 1080), 64, (112, 64)),
        ((1080, 1920), 32, (64, 112)),  # Preview of a 64 px model: the same minimum
    ],
)
def test_native_size_keeps_the_pixel_count_at_the_aspect(aspect, side, size) -> None:
    width, height = sizing.native_size(*aspect, side)
    assert (width, height) == size
    assert width % 8 == 0 and height % 8 == 0
    if side >= 512:
        assert abs(width * height / side**2 - 1) < 0.03
        assert abs((width / height) / (aspect[0] / aspect[1]) - 1) < 0.03


def test_native_side_from_builtins_folder_configs_or_default(tmp_path: Path) -> None:
    assert sizing.native_side("builtin:tiny") == 64
    assert sizing.native_side("builtin:shapes") == 64
    assert sizing.native_side(SD15) == 512
    assert sizing.native_side("") == 512
    folder = tmp_path / "sd2"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 96}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
    assert sizing.native_side(str(folder)) == 768
    (folder / "unet" / "config.json").write_text("not json")
    assert sizing.native_side(str(folder)) == 512


def test_oversize_is_above_twice_the_native_pixel_count() -> None:
    assert not sizing.is_oversize(720, 720, 512)  # 1.98x
    assert sizing.is_oversize(728, 728, 512)  # 2.02x
    assert sizing.is_oversize(1920, 1080, 512)  # 7.9x


def test_default_size_is_native_at_the_scene_aspect(scene) -> None:
    settings = scene.t2vz
    scene.render.resolution_x, scene.render.resolution_y = 1920, 1080
    assert settings.size_mode == "NATIVE"
    settings.model = SD15
    assert settings.size(scene) == (680, 384)
    assert settings.to_values(scene)["width"] == 680
    settings.model = ""  # the preferences' model: builtin:tiny in these tests (64 px)
    assert settings.size(scene) == (112, 64)
    settings.mode = "pix2pix"  # builtin:tiny-pix2pix, also 64 px
    assert settings.size(scene) == (112, 64)
    settings.size_mode = "SCENE"
    scene.render.resolution_percentage = 50
    assert settings.size(scene) == (960, 544)
    settings.model = SD15
    settings.size_mode = "CUSTOM"  # starts from the native size
    assert (settings.width, settings.height) == (680, 384)
    settings.width = 502
    assert settings.size(scene) == (504, 384)


def _size_log(scene) -> list:
    log: list = []
    panels.draw_size(Layout(log), scene, scene.t2vz)
    return log


def test_panel_shows_the_size_and_warns_far_above_native(scene) -> None:
    settings = scene.t2vz
    settings.model = SD15
    scene.render.resolution_x, scene.render.resolution_y = 1920, 1080
    log = _size_log(scene)
    labels = [text for kind, text in log if kind == "label"]
    assert labels == ["680 x 384 px, 1.0x native 512x512"]
    settings.size_mode = "SCENE"
    labels = [text for kind, text in _size_log(scene) if kind == "label"]
    assert labels[0] == "1920 x 1080 px, 7.9x native 512x512"
    assert any("7.9x the model's native pixel count" in text for text in labels[1:])
    settings.size_mode = "CUSTOM"
    settings.width, settings.height = 720, 720
    log = _size_log(scene)
    assert {"width", "height"} <= {name for kind, name in log if kind == "prop"}
    assert len([1 for kind, _ in log if kind == "label"]) == 1  # 1.98x: no warning


@pytest.mark.parametrize(
    ("result", "fit", "scale"),
    [((680, 384), "FILL", 1920 / 680), ((512, 512), "FIT", 1080 / 512)],
)
def test_result_strip_is_fitted_to_the_frame(scene, tmp_path: Path, result, fit, scale) -> None:
    scene.render.resolution_x, scene.render.resolution_y = 1920, 1080
    scene.render.resolution_percentage = 50  # the frame is the full resolution either way
    assert sizing.fit_method(*result, 1920, 1080) == fit
    frames = [write_png(tmp_path / f"frame_{i:05d}.png", *result, (9, 9, 9)) for i in (1, 2)]
    job = {"width": result[0], "height": result[1], "prompt": "p"}
    strip = strips.add_result_strip(scene, [str(f) for f in frames], 2, 1, "r", job)
    assert strip.transform.scale_x == pytest.approx(scale, rel=1e-5)
    assert strip.transform.scale_y == pytest.approx(scale, rel=1e-5)
    shown = (result[0] * strip.transform.scale_x, result[1] * strip.transform.scale_y)
    if fit == "FILL":  # covers the whole frame, cropping under 1 % of one side
        assert shown[0] >= 1920 - 1e-3 and shown[1] >= 1080 - 1e-3
        assert shown[1] / 1080 < 1.01
    else:  # a clearly different aspect is shown whole, letterboxed
        assert shown[0] <= 1920 and shown[1] == pytest.approx(1080)


def test_settings_panel_draws_the_size(scene) -> None:
    log: list = []
    panels.T2VZ_PT_settings.draw(SimpleNamespace(layout=Layout(log)), bpy.context)
    assert ("prop", "size_mode") in log
    assert any(kind == "label" and "native 64x64" in text for kind, text in log)


def _sdxl_checkpoint(path: Path) -> Path:
    """A .safetensors file whose header names SDXL's tensors (no weights needed to tell)."""
    header = {"conditioner.embedders.1.model.ln_final.weight": {
        "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}  # fmt: skip
    data = json.dumps(header).encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data + b"\0\0\0\0")
    return path


def test_native_size_and_family_follow_the_model_family(scene, tmp_path: Path) -> None:
    """An SDXL single file is 1024 px native (16:9 lands near 1360x768) and the panel names
    its family; a hub id not on disk shows none (a name never tells)."""
    checkpoint = _sdxl_checkpoint(tmp_path / "my-sd15-style.safetensors")
    assert sizing.native_side(str(checkpoint)) == 1024
    assert sizing.model_family(str(checkpoint)) == "sdxl"
    assert sizing.native_size(1920, 1080, 1024) == (1368, 768)
    assert sizing.model_family("builtin:tiny-xl") == "sdxl"
    assert sizing.model_family("builtin:shapes") == "sd1"
    assert sizing.model_family("builtin:shapes-xl") == "sdxl"
    assert sizing.model_family("builtin:shapes-xl-controlnet") == "sdxl"
    assert sizing.native_side("builtin:shapes-xl") == 64
    assert sizing.model_family("someone/sdxl-model") is None
    folder = tmp_path / "xl"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder_2").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 128}))
    assert sizing.family_label(str(folder)) == "SDXL"
    settings = scene.t2vz
    settings.model = str(checkpoint)
    scene.render.resolution_x, scene.render.resolution_y = 1920, 1080
    labels = [text for kind, text in _size_log(scene) if kind == "label"]
    assert labels == ["1368 x 768 px, 1.0x native 1024x1024 (SDXL)"]
