"""Panel presets through Blender's preset system: shipped looks, the user's own, visibility."""

import ast
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from test_panels import Layout

from blender_t2vz import backend_paths, panels, presets

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PROTOCOL = backend_paths.load_protocol()


def _apply(path: Path) -> None:
    result = bpy.ops.script.execute_preset(filepath=str(path), menu_idname=presets.MENU_IDNAME)
    assert result == {"FINISHED"}


def _visible_props(scene) -> set[str]:
    """Every panel property the sidebar draws, in every mode and size choice."""
    settings = scene.t2vz
    shown: set[str] = set()
    for mode in ("text2video", "controlnet", "pix2pix"):
        for size_mode in ("NATIVE", "CUSTOM"):
            settings.mode, settings.size_mode = mode, size_mode
            for cls in [c for c in panels.classes if issubclass(c, bpy.types.Panel)]:
                log: list = []
                if cls.poll(bpy.context):
                    cls.draw(SimpleNamespace(layout=Layout(log)), bpy.context)
                shown |= {name for kind, name in log if kind == "prop"}
    return shown


def _assignments(text: str) -> tuple[set[str], set[str]]:
    """(settings properties assigned, settings methods called) by a preset file."""
    assigned, called = set(), set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute):
                    assigned.add(target.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            called.add(node.func.attr)
    return assigned, called


def test_shipped_files_are_the_generated_presets() -> None:
    expected = presets.shipped_presets(PROTOCOL)
    files = {p.stem: p.read_text(encoding="utf-8") for p in presets.shipped_dir().glob("*.py")}
    assert {"Preview", "Final"} <= set(files)
    assert files == expected  # regenerate with presets.write_shipped() after changing them


def test_presets_only_fill_visible_fields(scene) -> None:
    visible = _visible_props(scene)
    saved = set(presets.PRESET_VALUES)
    assert saved <= visible, saved - visible
    assert not {"prompt", "seed", "model", "output_dir"} & saved
    for path in presets.shipped_dir().glob("*.py"):
        assigned, called = _assignments(path.read_text(encoding="utf-8"))
        assert assigned <= visible | {"size_mode"}, (path.name, assigned - visible)
        assert "prompt" not in assigned and "mode" not in assigned, path.name
        assert called <= {"use_look_words", "use_look_negative"}, (path.name, called)


def test_preview_and_final(scene) -> None:
    settings = scene.t2vz
    settings.model = SD15
    settings.prompt, settings.seed = "a red ball", 7
    scene.render.resolution_x, scene.render.resolution_y = 1920, 1080
    _apply(presets.shipped_dir() / "Preview.py")
    assert settings.steps == 20 and settings.size_mode == "PREVIEW"
    assert settings.size(scene) == (344, 192)  # a quarter of the native pixel count
    assert settings.write_mp4 is False
    _apply(presets.shipped_dir() / "Final.py")
    assert settings.steps == 50 and settings.size(scene) == (680, 384)
    assert settings.write_mp4 is True
    assert (settings.prompt, settings.seed, settings.model) == ("a red ball", 7, SD15)


def test_user_presets_save_apply_and_remove(scene) -> None:
    settings = scene.t2vz
    settings.steps, settings.guidance, settings.negative_prompt = 33, 5.5, "blurry"
    settings.motion = (4.0, -2.0)
    settings.size_mode = "CUSTOM"
    settings.width, settings.height = 320, 200
    assert bpy.ops.t2vz.preset_add(name="My Look") == {"FINISHED"}
    user_dir = Path(bpy.utils.user_resource("SCRIPTS", path="presets/t2vz"))
    path = user_dir / "My_Look.py"
    assert path.is_file()
    assert str(user_dir) in presets.preset_folders()
    assert presets.preset_folders()[0] == str(presets.shipped_dir())
    settings.property_unset("steps")
    settings.property_unset("guidance")
    settings.negative_prompt = ""
    settings.size_mode = "NATIVE"
    settings.prompt = "kept"
    _apply(path)
    assert (settings.steps, settings.guidance, settings.negative_prompt) == (33, 5.5, "blurry")
    assert tuple(settings.motion) == (4.0, -2.0)
    assert settings.size(scene) == (320, 200) and settings.prompt == "kept"
    # The same name again is refused; removing the active preset deletes the user's file.
    assert bpy.ops.t2vz.preset_add(name="My Look") == {"CANCELLED"}
    assert bpy.ops.t2vz.preset_add(name="My Look", remove_name=True) == {"FINISHED"}
    assert not path.exists()


def test_shipped_presets_cannot_be_removed(scene) -> None:
    path = presets.shipped_dir() / "Preview.py"
    text = path.read_text(encoding="utf-8")
    _apply(path)  # makes it the menu's active preset
    assert presets.T2VZ_MT_presets.bl_label == "Preview"
    with pytest.raises(RuntimeError):
        bpy.ops.t2vz.preset_add(remove_active=True)
    assert path.read_text(encoding="utf-8") == text


def test_official_looks_fill_visible_fields_and_show_their_prompt_words(scene, tmp_path) -> None:
    look = SimpleNamespace(
        name="official-x",
        label="Official X look",
        mode="controlnet",
        fields={"steps": 20, "guidance": 9.0},
        added_prompt="best quality",
        negative_prompt="lowres",
    )
    protocol = SimpleNamespace(
        PRESETS={look.name: look}, Job=PROTOCOL.Job, DEFAULT_MOTION=PROTOCOL.DEFAULT_MOTION
    )
    texts = presets.official_presets(protocol)
    assert list(texts) == ["Official_X_look"]
    path = tmp_path / "Official_X_look.py"
    path.write_text(texts["Official_X_look"], encoding="utf-8")
    settings = scene.t2vz
    settings.prompt = "a dancer,"
    _apply(path)
    # Only what the look names: its mode (ControlNet) stays the artist's choice.
    assert (settings.mode, settings.steps, settings.guidance) == ("text2video", 20, 9.0)
    assert settings.prompt == "a dancer, best quality"  # in the field, for the user to see
    assert settings.negative_prompt == "lowres"
    settings.negative_prompt = "mine"
    _apply(path)  # twice: the words are not added again, the user's negative prompt stays
    assert settings.prompt == "a dancer, best quality" and settings.negative_prompt == "mine"
    hidden = SimpleNamespace(**{**vars(look), "fields": {"t0": 40}})
    with pytest.raises(presets.PresetError, match="'t0'"):
        presets.official_presets(SimpleNamespace(**{**vars(protocol), "PRESETS": {"h": hidden}}))


@pytest.mark.parametrize("name", sorted(PROTOCOL.PRESETS))
def test_official_look_in_the_panel_makes_the_protocols_job(scene, name: str) -> None:
    preset = PROTOCOL.PRESETS[name]
    settings = scene.t2vz
    settings.mode = preset.mode  # a look never changes the mode: the artist picks it
    for field in ("steps", "guidance"):  # the panel's defaults are the job's
        settings.property_unset(field)
    settings.prompt = "a dancer"
    _apply(presets.shipped_dir() / f"{presets._file_name(preset.label)}.py")
    job = PROTOCOL.apply_preset({"prompt": "a dancer", "out": "o"}, name)
    if preset.mode == "controlnet":
        job["controlnets"] = [{"model": "m", "control": "c"}]
    job = PROTOCOL.validate_job(job)
    assert settings.mode == preset.mode
    assert (settings.prompt, settings.negative_prompt) == (job.prompt, job.negative_prompt)
    assert (settings.steps, settings.guidance) == (job.steps, job.guidance)
    if preset.mode == "text2video":
        assert list(settings.motion) == list(job.effective_motion)


def test_settings_panel_draws_the_preset_menu(scene) -> None:
    log: list = []
    panels.T2VZ_PT_settings.draw(SimpleNamespace(layout=Layout(log)), bpy.context)
    assert ("menu", presets.MENU_IDNAME) in log
    assert ("operator", "t2vz.preset_add") in log


def test_preset_menu_lists_the_shipped_folder_then_blenders(scene) -> None:
    calls: list = []
    menu = SimpleNamespace(
        path_menu=lambda paths, operator, **kw: calls.append((paths, operator, kw)),
        preset_operator=presets.T2VZ_MT_presets.preset_operator,
        preset_add_operator=presets.T2VZ_MT_presets.preset_add_operator,
    )
    presets.T2VZ_MT_presets.draw(menu, bpy.context)
    ((paths, operator, kw),) = calls
    assert paths[0] == str(presets.shipped_dir()) and len(set(paths)) == len(paths)
    assert operator == "script.execute_preset" and kw["add_operator"] == "t2vz.preset_add"
    assert kw["filter_ext"](".py") and not kw["filter_ext"](".xml")


def _look_path(name: str) -> Path:
    return presets.shipped_dir() / f"{presets._file_name(PROTOCOL.PRESETS[name].label)}.py"


def test_looks_change_only_what_they_name_and_replace_each_others_words(scene) -> None:
    """Issue 19: a look switched text to video to ControlNet, and a second look appended
    its words to the first's."""
    settings = scene.t2vz
    settings.prompt = "a dancer"
    settings.steps, settings.guidance = 7, 3.0
    _apply(_look_path("official-controlnet"))
    assert settings.mode == "text2video"
    controlnet = PROTOCOL.PRESETS["official-controlnet"]
    text2video = PROTOCOL.PRESETS["official-text2video"]
    assert settings.prompt == f"a dancer, {controlnet.added_prompt}"
    assert settings.negative_prompt == controlnet.negative_prompt
    _apply(_look_path("official-text2video"))
    # Its words replace the other look's; the fields it does not name stay as they were.
    assert settings.prompt == f"a dancer, {text2video.added_prompt}"
    assert settings.negative_prompt == ""  # the other look's negative prompt went with it
    assert (settings.mode, settings.steps, settings.guidance) == ("text2video", 20, 9.0)
    _apply(_look_path("official-controlnet"))
    _apply(_look_path("official-controlnet"))
    assert settings.prompt == f"a dancer, {controlnet.added_prompt}"
    settings.negative_prompt = "blurry"  # the artist's own stays through a look switch
    _apply(_look_path("official-text2video"))
    assert settings.negative_prompt == "blurry"
