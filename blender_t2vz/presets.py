"""Panel presets through Blender's own preset system: shipped looks and the user's own.

A preset is a Python file of assignments to the panel's settings (``scene.t2vz``), the
format Blender's ``AddPresetBase`` writes, run by ``script.execute_preset``. Presets only
fill fields the panel shows, and only those they name; an official look's prompt words go at
the end of the visible prompt field (replacing another look's), never behind the user's
back.

Shipped presets live in ``presets/t2vz/`` beside this module: Preview and Final, and one per
official look that the backend's protocol defines (``protocol.PRESETS``); ``write_shipped``
regenerates those files and a test checks they match. Users' presets go to Blender's user
presets folder (``scripts/presets/t2vz``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import bpy
from bl_operators.presets import AddPresetBase

from . import backend_paths

PRESET_SUBDIR = "t2vz"
MENU_IDNAME = "T2VZ_MT_presets"
DEFINE = "settings = bpy.context.scene.t2vz"
# What a saved preset holds: the look, not the clip (no prompt, seed, model, frames, output).
PRESET_VALUES = (
    "negative_prompt",
    "steps",
    "guidance",
    "image_guidance",
    "motion",
    "size_mode",
    "width",
    "height",
    "smooth_bg",
    "smooth_alpha",
    "write_mp4",
)
# Job fields an official look may set, and the panel property that shows each one.
JOB_TO_PANEL = {
    "steps": "steps",
    "guidance": "guidance",
    "image_guidance": "image_guidance",
    "motion": "motion",
    "smooth_bg": "smooth_bg",
    "smooth_alpha": "smooth_alpha",
    "chunk_size": "chunk_size",
    "frames": "frames",
}
# The shipped looks of this add-on, as panel values (file name -> values).
BUILTIN = {
    # Few steps at a quarter of the native pixel count: composition and motion in seconds.
    "Preview": {"steps": 20, "size_mode": "PREVIEW", "write_mp4": False},
    # The paper's 50 DDIM steps at the model's native size, with a playable mp4.
    "Final": {"steps": 50, "size_mode": "NATIVE", "write_mp4": True},
}


class PresetError(ValueError):
    """An official look sets a job field the panel does not show."""


def shipped_root() -> Path:
    """The folder holding ``presets/t2vz/`` (the add-on's folder)."""
    return backend_paths.addon_dir()


def shipped_dir() -> Path:
    """The shipped presets' folder."""
    return shipped_root() / "presets" / PRESET_SUBDIR


def preset_text(values: Mapping[str, Any], calls: Mapping[str, str] | None = None) -> str:
    """A preset file setting ``values`` on the panel (and calling its methods with text)."""
    lines = ["import bpy", DEFINE, ""]
    lines += [f"settings.{name} = {value!r}" for name, value in values.items()]
    lines += [f"settings.{method}({text!r})" for method, text in (calls or {}).items()]
    return "\n".join(lines) + "\n"


def _file_name(label: str) -> str:
    """A preset file name from a menu label (Blender shows underscores as spaces)."""
    return AddPresetBase.as_filename(label)


def official_presets(protocol: Any) -> dict[str, str]:
    """File name -> preset text for each official look in ``protocol.PRESETS``.

    A look sets only the fields it names (never the mode: a look fits any mode that uses
    those fields), puts its words at the end of the prompt in place of another look's, and
    its negative prompt where the field is empty or holds another look's.
    """
    texts = {}
    for preset in getattr(protocol, "PRESETS", {}).values():
        values: dict[str, Any] = {}
        for field, value in preset.fields.items():
            if field not in JOB_TO_PANEL:
                raise PresetError(f"preset {preset.name}: the panel does not show {field!r}")
            values[JOB_TO_PANEL[field]] = list(value) if isinstance(value, list) else value
        calls = {
            "use_look_words": preset.added_prompt,
            "use_look_negative": preset.negative_prompt,
        }
        texts[_file_name(preset.label)] = preset_text(values, calls)
    return texts


def shipped_presets(protocol: Any) -> dict[str, str]:
    """File name (without .py) -> text of every shipped preset."""
    texts = {name: preset_text(values) for name, values in BUILTIN.items()}
    texts.update(official_presets(protocol))
    return texts


def write_shipped(folder: Path | None = None) -> list[Path]:
    """(Re)write the shipped preset files from BUILTIN and the protocol's looks."""
    folder = folder or shipped_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in shipped_presets(backend_paths.load_protocol()).items():
        path = folder / f"{name}.py"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def preset_folders() -> list[str]:
    """Where presets are found: the shipped folder first, then Blender's preset paths."""
    shipped = str(shipped_dir())
    return [shipped] + [p for p in bpy.utils.preset_paths(PRESET_SUBDIR) if p != shipped]


def is_shipped(path: str | os.PathLike[str]) -> bool:
    """True for a preset file that ships with the add-on (never removed)."""
    return Path(path).resolve().parent == shipped_dir().resolve()


class T2VZ_MT_presets(bpy.types.Menu):
    """Looks for the panel's settings: shipped ones and your own"""

    bl_label = "Presets"
    bl_idname = MENU_IDNAME
    preset_subdir = PRESET_SUBDIR
    preset_operator = "script.execute_preset"
    preset_add_operator = "t2vz.preset_add"

    def draw(self, context: Any) -> None:
        self.path_menu(
            preset_folders(),
            self.preset_operator,
            filter_ext=lambda ext: ext.lower() == ".py",
            add_operator=self.preset_add_operator,
            display_name=lambda name: bpy.path.display_name(name, title_case=False),
        )


class T2VZ_OT_preset_add(AddPresetBase, bpy.types.Operator):
    """Save the panel's look (steps, guidance, size, ...) as a preset, or remove one"""

    bl_idname = "t2vz.preset_add"
    bl_label = "Add T2VZ Preset"
    preset_menu = MENU_IDNAME
    preset_subdir = PRESET_SUBDIR
    preset_defines = [DEFINE]
    preset_values = [f"settings.{name}" for name in PRESET_VALUES]

    def remove(self, context: Any, filepath: str) -> None:
        """Delete a user preset; the shipped ones stay."""
        if is_shipped(filepath):
            raise PermissionError(f"{Path(filepath).stem} ships with the add-on")
        os.remove(filepath)


def draw_menu(layout: Any) -> None:
    """The preset menu with add and remove buttons, for a panel."""
    row = layout.row(align=True)
    row.menu(MENU_IDNAME, text=T2VZ_MT_presets.bl_label)
    row.operator("t2vz.preset_add", text="", icon="ADD")
    row.operator("t2vz.preset_add", text="", icon="REMOVE").remove_active = True


classes = (T2VZ_MT_presets, T2VZ_OT_preset_add)


def register() -> None:
    """Register the menu and the add/remove operator, and the shipped presets' folder."""
    for cls in classes:
        bpy.utils.register_class(cls)
    # Lets Blender's own preset lookups (name clashes, removal) see the shipped presets.
    if hasattr(bpy.utils, "register_preset_path"):
        bpy.utils.register_preset_path(str(shipped_root()))


def unregister() -> None:
    """Unregister them."""
    if hasattr(bpy.utils, "unregister_preset_path"):
        bpy.utils.unregister_preset_path(str(shipped_root()))
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
