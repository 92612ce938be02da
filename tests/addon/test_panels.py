"""The panels' and preferences' draw code against a recording layout (no UI headless).

Every ``prop`` must name a real property and every ``operator`` a registered operator.
"""

from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest

from blender_t2vz import panels, preferences, strips


class Layout:
    """Records what a draw function asks for and checks it exists."""

    def __init__(self, log: list, buttons: list | None = None):
        self.log = log
        self.buttons = [] if buttons is None else buttons  # (idname, its properties)

    def _child(self, *args, **kwargs) -> "Layout":
        return Layout(self.log, self.buttons)

    row = column = box = split = _child

    def prop(self, data, name: str, **kwargs) -> None:
        rna = getattr(data, "bl_rna", None)
        assert hasattr(data, name) and (rna is None or name in rna.properties), name
        self.log.append(("prop", name))
        if "text" in kwargs:
            self.log.append(("prop_text", (name, kwargs["text"])))

    def operator(self, idname: str, **kwargs) -> SimpleNamespace:
        module, name = idname.split(".")
        getattr(getattr(bpy.ops, module), name).get_rna_type()  # raises when missing
        self.log.append(("operator", idname))
        button = SimpleNamespace()
        self.buttons.append((idname, button))
        return button

    def prop_enum(self, data, name: str, value: str, **kwargs) -> None:
        assert value in {i.identifier for i in data.bl_rna.properties[name].enum_items}, value
        self.log.append(("prop", name))

    def menu(self, menu: str, **kwargs) -> None:
        assert hasattr(bpy.types, menu), menu
        self.log.append(("menu", menu))

    def prop_search(self, data, name, search_data, search_name, **kwargs) -> None:
        assert hasattr(data, name) and hasattr(search_data, search_name), (name, search_name)
        self.log.append(("prop_search", search_name))

    def template_list(self, list_type, list_id, data, name, active_data, active_name, **kw) -> None:
        assert (
            hasattr(bpy.types, list_type)
            and hasattr(data, name)
            and hasattr(active_data, active_name)
        )
        self.log.append(("list", name))

    def label(self, **kwargs) -> None:
        self.log.append(("label", kwargs.get("text", "")))

    def progress(self, **kwargs) -> None:
        self.log.append(("progress", kwargs.get("factor")))

    def template_icon(self, **kwargs) -> None:
        self.log.append(("icon", kwargs.get("icon_value")))


def download_buttons(panel_cls) -> list[tuple[str, str]]:
    """(model, kind) of each download button the panel draws."""
    layout = Layout([])
    panel_cls.draw(SimpleNamespace(layout=layout), bpy.context)
    return [(b.model, b.kind) for name, b in layout.buttons if name == "t2vz.model_download"]


def _draw(panel_cls, context=None) -> list:
    log: list = []
    panel_cls.draw(SimpleNamespace(layout=Layout(log)), context or bpy.context)
    return log


@pytest.mark.parametrize("mode", ["text2video", "controlnet", "pix2pix"])
def test_panels_draw_in_every_mode(scene, image_folder: Path, mode: str) -> None:
    editor = scene.sequence_editor
    strip = strips.top_strips(editor).new_image(
        name="user images", filepath=str(image_folder / "img_1.png"), channel=1, frame_start=1
    )
    editor.active_strip = strip
    settings = scene.t2vz
    settings.mode = mode
    for source in ("ACTIVE_STRIP", "STRIP", "SCENE"):
        item = settings.controlnets.add()
        item.source = source
    settings.size_mode = "CUSTOM"
    log = []
    for cls in [c for c in panels.classes if issubclass(c, bpy.types.Panel)]:
        if cls.poll(bpy.context):
            for index in range(len(settings.controlnets)):
                settings.controlnet_index = index
                log += _draw(cls)
    props = {name for kind, name in log if kind == "prop"}
    assert {"mode", "prompt", "negative_prompt", "model", "seed", "steps", "chunk_size"} <= props
    assert ("operator", "t2vz.generate") in log and ("operator", "t2vz.randomize_seed") in log
    assert ("motion" in props) == (mode == "text2video")
    assert ("image_guidance" in props) == (mode == "pix2pix")
    assert ("weight" in props) == (mode == "controlnet")
    assert {"width", "height"} <= props
    assert ("label", "Source: user images (1 frames)") in log or mode == "text2video"


def test_preferences_draw(addon) -> None:
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    log: list = []

    class Self:
        layout = Layout(log)

        def __getattr__(self, name):
            return getattr(prefs, name)

    preferences.T2VZ_Preferences.draw(Self(), bpy.context)
    assert ("operator", "t2vz.install_backend") in log
    assert {"python_path", "model", "controlnet_depth", "device"} <= {
        n for k, n in log if k == "prop"
    }


def test_hub_ids_in_model_fields_get_a_download_button(scene) -> None:
    """The base model and each ControlNet, like a LoRA, can be fetched before the job."""
    settings = scene.t2vz
    settings.mode = "controlnet"
    item = settings.controlnets.add()
    for model, expected in (
        ("", []),  # the preferences' model: downloaded there
        ("/models/dreamshaper.safetensors", []),  # a local file
        (" owner/dreamshaper ", [("owner/dreamshaper", "model")]),
        ("owner/repo/v8.safetensors", [("owner/repo/v8.safetensors", "model")]),
    ):
        settings.model = model
        assert download_buttons(panels.T2VZ_PT_main) == expected, model
    item.model = "lllyasviel/sd-controlnet-canny"
    assert download_buttons(panels.T2VZ_PT_controlnets) == [
        ("lllyasviel/sd-controlnet-canny", "controlnet")
    ]
    item.model = "builtin:tiny-controlnet"
    assert download_buttons(panels.T2VZ_PT_controlnets) == []
