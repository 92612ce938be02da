"""The panel's LoRA and embedding list: operators, jobs built from it, regenerate, draw."""

import json
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from test_panels import Layout, download_buttons

from blender_t2vz import jobs, operators, panels, strips


def _add(settings, kind: str, path: str, **values):
    bpy.ops.t2vz.adapter_add(kind=kind)
    item = settings.adapters[settings.adapter_index]
    item.path = path
    for name, value in values.items():
        setattr(item, name, value)
    return item


@pytest.fixture
def listed(scene, tmp_path: Path):
    """A text2video panel with two LoRAs (one disabled) and an embedding."""
    settings = scene.t2vz
    settings.adapters.clear()
    settings.prompt = "a <shiny> cat"
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    _add(settings, "LORA", str(lora), weight=0.75)
    _add(settings, "LORA", "owner/other-lora", enabled=False)
    _add(settings, "EMBEDDING", "owner/shiny-embedding", token=" <shiny> ")
    yield settings, lora
    settings.adapters.clear()


def test_job_carries_the_enabled_loras_and_embeddings(listed) -> None:
    settings, lora = listed
    assert [a.kind for a in settings.adapters] == ["LORA", "LORA", "EMBEDDING"]
    assert settings.adapter_index == 2
    job = operators.plan_from_panel(bpy.context).job
    assert job["loras"] == [{"path": str(lora), "weight": 0.75}]
    assert job["embeddings"] == [{"path": "owner/shiny-embedding", "token": "<shiny>"}]


def test_blend_relative_lora_paths_become_absolute(listed) -> None:
    settings, _ = listed
    settings.adapters[0].path = "//loras/style.safetensors"
    (value,) = [a for a in settings.to_values(bpy.context.scene)["adapters"] if a["kind"] == "lora"]
    assert not value["path"].startswith("//")
    assert value["path"] == bpy.path.abspath("//loras/style.safetensors")


def test_missing_path_or_token_names_the_entry(listed) -> None:
    settings, _ = listed
    settings.adapters[2].token = "  "
    with pytest.raises(jobs.JobBuildError, match="Embedding 2: type the token"):
        operators.plan_from_panel(bpy.context)
    settings.adapters[0].path = ""
    with pytest.raises(jobs.JobBuildError, match="LoRA 1: choose a .safetensors file"):
        operators.plan_from_panel(bpy.context)
    with pytest.raises(RuntimeError, match="LoRA 1"):  # the operator reports it
        bpy.ops.t2vz.generate()


def test_remove_and_the_empty_list(listed) -> None:
    settings, _ = listed
    settings.adapter_index = 0
    assert bpy.ops.t2vz.adapter_remove() == {"FINISHED"}
    assert [a.path for a in settings.adapters] == ["owner/other-lora", "owner/shiny-embedding"]
    settings.adapters.clear()
    assert not bpy.ops.t2vz.adapter_remove.poll()
    job = operators.plan_from_panel(bpy.context).job
    assert job["loras"] == [] and job["embeddings"] == []


def test_regenerate_takes_the_panel_list_and_load_settings_restores_it(listed) -> None:
    settings, lora = listed
    job = operators.plan_from_panel(bpy.context).job
    frame = Path(job["out"]).parent / "frames" / "frame_00001.png"
    frame.parent.mkdir(parents=True)
    frame.write_bytes(b"")
    strip = strips.add_result_strip(bpy.context.scene, [str(frame)], 2, 1, "result", job)
    bpy.context.scene.sequence_editor.active_strip = strip
    strip.select = True
    settings.adapters[0].weight = -1.0
    new = operators.plan_regenerate(bpy.context, strip).job
    assert new["loras"] == [{"path": str(lora), "weight": -1.0}]
    settings.adapters.clear()
    assert operators.plan_regenerate(bpy.context, strip).job["loras"] == []
    assert bpy.ops.t2vz.load_settings() == {"FINISHED"}
    assert [(a.kind, a.path, a.weight) for a in settings.adapters if a.kind == "LORA"] == [
        ("LORA", str(lora), 0.75)
    ]
    assert [(a.kind, a.token) for a in settings.adapters if a.kind == "EMBEDDING"] == [
        ("EMBEDDING", "<shiny>")
    ]
    assert json.loads(strip["t2vz_job"])["loras"][0]["weight"] == 0.75


def test_panel_draws_the_list_and_each_kind(listed) -> None:
    settings, _ = listed
    for index, expected in ((0, "weight"), (2, "token")):
        settings.adapter_index = index
        log: list = []
        panels.T2VZ_PT_adapters.draw(SimpleNamespace(layout=Layout(log)), bpy.context)
        props = {name for kind, name in log if kind == "prop"}
        assert ("list", "adapters") in log and ("operator", "t2vz.adapter_add") in log
        assert {"kind", "path", expected} <= props
        assert ("weight" in props) == (expected == "weight")
    settings.prompt = "a cat"  # the token is missing from the prompt: the panel says so
    log = []
    panels.T2VZ_PT_adapters.draw(SimpleNamespace(layout=Layout(log)), bpy.context)
    assert ("label", "Use <shiny> in the prompt") in log


def test_hub_ids_in_the_list_get_a_download_button_files_do_not(listed) -> None:
    settings, lora = listed
    for index, path, expected in (
        (0, str(lora), None),  # a local file: nothing to download
        (1, "owner/other-lora", ("owner/other-lora", "lora")),
        (1, " owner/loras/style-b.safetensors", ("owner/loras/style-b.safetensors", "lora")),
        (2, "owner/shiny-embedding", ("owner/shiny-embedding", "embedding")),
    ):
        settings.adapter_index = index
        settings.adapters[index].path = path
        buttons = download_buttons(panels.T2VZ_PT_adapters)
        assert buttons == ([expected] if expected else []), path
