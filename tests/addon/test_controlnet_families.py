"""The ControlNets the panel offers and sends follow the base model's family (issue 20):
known hub ids by the protocol's table, local folders and files by their own configs and
tensor names (no torch), and a ControlNet of another family is refused before Generate,
naming both models and families."""

import json
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from test_panels import Layout, _draw

from blender_t2vz import backend_paths, jobs, model_families, operators, panels, strips

PROTOCOL = backend_paths.load_protocol()
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_PREFS = {
    "model": SD15,
    "pix2pix_model": "timbrooks/instruct-pix2pix",
    "controlnet_models": {
        "canny": "lllyasviel/sd-controlnet-canny",
        "none": "lllyasviel/sd-controlnet-canny",
        "openpose": "lllyasviel/sd-controlnet-openpose",
        "depth": "lllyasviel/sd-controlnet-depth",
    },
}
CLIP = {"path": "/clips/in", "start": 0, "stride": 1.0}


def _controlnet_folder(folder: Path, **config) -> Path:
    """A diffusers ControlNet folder's config.json (the family is read from it alone)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
    return folder


def _checkpoint(path: Path, names: list[str]) -> Path:
    """A .safetensors file whose header lists ``names`` (1-element float tensors)."""
    header = {n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i, n in enumerate(names)}  # fmt: skip
    data = json.dumps(header).encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data + b"\0" * 4 * len(names))
    return path


def _build(model: str, entries: list[dict], defaults: dict = SD15_PREFS) -> dict:
    return jobs.build_job(
        {"prompt": "a cat", "model": model, "mode": "controlnet", "controlnets": entries},
        out="/o",
        fps=24,
        defaults=defaults,
        source_frames=3,
        controls=[CLIP] * len(entries),
    )


def test_families_come_from_files_the_table_or_nowhere(tmp_path: Path) -> None:
    xl = _controlnet_folder(tmp_path / "cn-xl", addition_embed_type="text_time")
    sd2 = _controlnet_folder(tmp_path / "cn-sd2", use_linear_projection=True)
    sd1 = _controlnet_folder(tmp_path / "cn-sd1", cross_attention_dim=768)
    xl_file = _checkpoint(tmp_path / "pose.safetensors", ["control_model.label_emb.0.0.weight"])
    assert model_families.model_family(str(xl)) == "sdxl"
    assert model_families.model_family(str(sd2)) == "sd2"
    assert model_families.model_family(str(sd1)) == "sd1"
    assert model_families.model_family(f"  {xl_file}  ") == "sdxl"
    assert model_families.model_family("diffusers/controlnet-canny-sdxl-1.0") == "sdxl"
    assert model_families.model_family("thibaud/controlnet-sd21-depth-diffusers") == "sd2"
    assert model_families.model_family(SD15) == "sd1"
    assert model_families.model_family("builtin:tiny-xl-controlnet") == "sdxl"
    assert model_families.model_family("builtin:tiny-controlnet") == "sd1"
    assert model_families.model_family("someone/sdxl-controlnet") is None  # a name never tells
    assert model_families.model_family("") is None
    # Every default names a known ControlNet of its own family and kind.
    for family, by_kind in PROTOCOL.DEFAULT_CONTROLNETS.items():
        for kind, model in by_kind.items():
            known = PROTOCOL.KNOWN_CONTROLNETS[model]
            assert (known.family, known.kind) == (family, kind)


def test_an_entry_without_a_model_gets_the_base_familys_default(tmp_path: Path) -> None:
    entries = [
        {"detector": "canny"},
        {"detector": "none", "model_kind": "depth"},  # a rendered depth pass
        {"detector": "openpose"},
        {"detector": "none"},  # images as they are: canny's model
    ]
    sd15 = [c["model"] for c in _build(SD15, entries)["controlnets"]]
    assert sd15 == [
        "lllyasviel/sd-controlnet-canny",
        "lllyasviel/sd-controlnet-depth",
        "lllyasviel/sd-controlnet-openpose",
        "lllyasviel/sd-controlnet-canny",
    ]
    xl = [c["model"] for c in _build(SDXL, entries)["controlnets"]]
    assert xl == [
        "diffusers/controlnet-canny-sdxl-1.0",
        "diffusers/controlnet-depth-sdxl-1.0",
        "thibaud/controlnet-openpose-sdxl-1.0",
        "diffusers/controlnet-canny-sdxl-1.0",
    ]
    sd2 = _build("stabilityai/stable-diffusion-2-1-base", entries[:1])["controlnets"]
    assert sd2[0]["model"] == "thibaud/controlnet-sd21-canny-diffusers"
    # The preferences' own ControlNet stays where it fits the base (same family) or where
    # nothing tells its family; a base of unknown family keeps the preferences' models.
    own_xl = str(_controlnet_folder(tmp_path / "my-xl", addition_embed_type="text_time"))
    prefs = {**SD15_PREFS, "controlnet_models": {"canny": own_xl, "depth": "someone/depth"}}
    kept = _build(SDXL, entries[:2], prefs)["controlnets"]
    assert [c["model"] for c in kept] == [own_xl, "someone/depth"]
    unknown = _build("someone/base", entries[:2])["controlnets"]
    assert [c["model"] for c in unknown] == [
        "lllyasviel/sd-controlnet-canny",
        "lllyasviel/sd-controlnet-depth",
    ]


def test_a_controlnet_of_another_family_is_refused_naming_both(tmp_path: Path) -> None:
    refused = (
        r"^ControlNet 2 'lllyasviel/sd-controlnet-depth' is an SD 1\.x ControlNet, but the "
        r"base model 'stabilityai/stable-diffusion-xl-base-1\.0' is SDXL: pick an SDXL "
        r"ControlNet$"
    )
    entries = [{"detector": "canny"}, {"model": "lllyasviel/sd-controlnet-depth"}]
    with pytest.raises(jobs.JobBuildError, match=refused):
        _build(SDXL, entries)
    xl_file = _checkpoint(tmp_path / "x.safetensors", ["add_embedding.linear_1.weight"])
    with pytest.raises(jobs.JobBuildError, match=r"is an SDXL ControlNet, but .* is SD 1\.x"):
        _build(SD15, [{"model": str(xl_file)}])
    # Unknown families pass: the backend reads them once downloaded.
    assert _build(SDXL, [{"model": "someone/cn"}])["controlnets"][0]["model"] == "someone/cn"
    # Regenerating on a base of another family is refused the same way.
    stored = _build(SD15, [{"detector": "canny"}])
    with pytest.raises(jobs.JobBuildError, match="is an SD 1.x ControlNet, but the base"):
        jobs.rebuild_job(stored, {"model": SDXL}, out="/n", defaults=SD15_PREFS)
    # ... unless the entry's new detector takes the new family's default.
    rebuilt = jobs.rebuild_job(
        stored,
        {"model": SDXL, "controlnets": [{"detector": "openpose"}]},
        out="/n",
        defaults=SD15_PREFS,
    )
    assert rebuilt["controlnets"][0]["model"] == "thibaud/controlnet-openpose-sdxl-1.0"


def test_a_union_controlnet_gets_its_entrys_control_type(tmp_path: Path) -> None:
    union = "xinsir/controlnet-union-sdxl-1.0"
    entries = [
        {"model": union, "detector": "none", "model_kind": "depth"},  # a scene depth pass
        {"model": union, "detector": "openpose"},
        {"model": "diffusers/controlnet-canny-sdxl-1.0", "detector": "canny"},
    ]
    controlnets = _build(SDXL, entries)["controlnets"]
    assert [c.get("control_type") for c in controlnets] == ["depth", "openpose", None]
    folder = _controlnet_folder(
        tmp_path / "union", _class_name="ControlNetUnionModel", addition_embed_type="text_time"
    )
    entry = {"model": str(folder), "detector": "none", "model_kind": "openpose"}
    assert _build(SDXL, [entry])["controlnets"][0]["control_type"] == "openpose"
    # An aux detector with no model names an example of the base's family.
    with pytest.raises(jobs.JobBuildError, match=f"set the Model, e.g. {union}$"):
        _build(SDXL, [{"detector": "hed"}])
    with pytest.raises(jobs.JobBuildError, match="e.g. lllyasviel/control_v11p_sd15_softedge$"):
        _build(SD15, [{"detector": "hed"}])


def test_the_offered_controlnets_are_the_base_familys(tmp_path: Path) -> None:
    sd1_folder = str(_controlnet_folder(tmp_path / "sd1", cross_attention_dim=768))
    xl_folder = str(_controlnet_folder(tmp_path / "xl", addition_embed_type="text_time"))
    own = [sd1_folder, xl_folder, "someone/cn", "", "diffusers/controlnet-depth-sdxl-1.0"]
    offers = model_families.offered_controlnets("sdxl", "depth", own)
    models = [o.model for o in offers]
    # The entry's kind (and the union model) first, then the family's others, then own ones.
    assert models == [
        "diffusers/controlnet-depth-sdxl-1.0",
        "xinsir/controlnet-union-sdxl-1.0",
        "diffusers/controlnet-canny-sdxl-1.0",
        "thibaud/controlnet-openpose-sdxl-1.0",
        xl_folder,
        "someone/cn",
    ]
    texts = {o.model: o.text for o in offers}
    assert (
        texts["diffusers/controlnet-depth-sdxl-1.0"] == "Depth: diffusers/controlnet-depth-sdxl-1.0"
    )
    assert texts["thibaud/controlnet-openpose-sdxl-1.0"].endswith("(pickled weights)")
    assert texts[xl_folder] == f"{xl_folder} (SDXL)"
    assert texts["someone/cn"] == "someone/cn (family unknown)"
    # A base of unknown family: every family's, each marked with it.
    every = model_families.offered_controlnets(None, "canny")
    assert {o.family for o in every} == {"sd1", "sd2", "sdxl"}
    assert "SD 2.x Canny: thibaud/controlnet-sd21-canny-diffusers (pickled weights)" in {
        o.text for o in every
    }


@pytest.fixture
def xl_scene(scene, tmp_path: Path, image_folder: Path):
    """ControlNet mode on an SDXL base (a local folder) with one canny entry fed by the
    active image strip."""
    editor = scene.sequence_editor
    editor.active_strip = strips.top_strips(editor).new_image(
        name="frames", filepath=str(image_folder / "img_1.png"), channel=1, frame_start=1
    )
    base = tmp_path / "xl-base"
    (base / "unet").mkdir(parents=True)
    (base / "text_encoder_2").mkdir()
    (base / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.model = str(base)
    item = settings.controlnets.add()
    item.detector = "canny"
    settings.controlnet_index = 0
    return scene


def _menu(context) -> list[tuple[str, str]]:
    """(text, model) of each button the ControlNet models menu draws."""
    log: list = []
    buttons: list = []
    menu = SimpleNamespace(layout=_RecordingText(log, buttons))
    panels.T2VZ_MT_controlnet_models.draw(menu, context)
    return [(text, b.model) for (name, b), text in zip(buttons, menu.layout.texts, strict=True)]


class _RecordingText(Layout):
    """A Layout that also keeps each operator button's text."""

    def __init__(self, log, buttons):
        super().__init__(log, buttons)
        self.texts: list[str] = []

    def operator(self, idname: str, **kwargs):
        self.texts.append(kwargs.get("text", ""))
        return super().operator(idname, **kwargs)


def test_the_panel_offers_and_checks_the_base_familys_controlnets(xl_scene) -> None:
    """The testing preferences name builtin:tiny-controlnet (SD 1.x) for every kind."""
    settings = xl_scene.t2vz
    item = settings.controlnets[0]
    # Empty Model on an SDXL base: the SD 1.x preference gives way to SDXL's canny.
    log = _draw(panels.T2VZ_PT_controlnets)
    assert ("menu", "T2VZ_MT_controlnet_models") in log
    labels = [text for kind, text in log if kind == "label"]
    assert "Uses diffusers/controlnet-canny-sdxl-1.0" in labels and "SDXL ControlNet" in labels
    assert operators._input_problem(bpy.context) == ""
    buttons = _menu(bpy.context)
    assert buttons[0] == ("Default: diffusers/controlnet-canny-sdxl-1.0", "")
    models = [model for _, model in buttons[1:]]
    assert models[:2] == ["diffusers/controlnet-canny-sdxl-1.0", "xinsir/controlnet-union-sdxl-1.0"]
    assert (
        "builtin:tiny-controlnet" not in models and "lllyasviel/sd-controlnet-canny" not in models
    )
    # Picking one sets the entry's Model.
    with bpy.context.temp_override(scene=xl_scene):
        assert bpy.ops.t2vz.controlnet_use(model="diffusers/controlnet-depth-sdxl-1.0") == {
            "FINISHED"
        }
    assert item.model == "diffusers/controlnet-depth-sdxl-1.0"
    # An SD 1.x ControlNet: a warning in both panels and Generate's poll, naming both.
    item.model = "builtin:tiny-controlnet"
    problem = (
        f"ControlNet 1 'builtin:tiny-controlnet' is an SD 1.x ControlNet, but the base model "
        f"{settings.model!r} is SDXL: pick an SDXL ControlNet"
    )
    assert operators._input_problem(bpy.context) == problem
    assert not bpy.ops.t2vz.generate.poll()
    main = " ".join(text for kind, text in _draw(panels.T2VZ_PT_main) if kind == "label")
    assert "is an SD 1.x ControlNet, but the base model" in main
    entry = " ".join(text for kind, text in _draw(panels.T2VZ_PT_controlnets) if kind == "label")
    assert "ControlNet 'builtin:tiny-controlnet' is an SD 1.x ControlNet" in entry
    # A disabled entry takes no part in the job, so it stops nothing.
    item.enabled = False
    settings.controlnets.add().model = "someone/cn"
    assert operators._input_problem(bpy.context) == ""


def test_the_panel_marks_unknown_and_pickled_controlnets(xl_scene) -> None:
    item = xl_scene.t2vz.controlnets[0]
    item.model = "someone/cn"
    labels = [text for kind, text in _draw(panels.T2VZ_PT_controlnets) if kind == "label"]
    assert "Family unknown until it is downloaded: the backend checks it" in labels
    item.model = "thibaud/controlnet-openpose-sdxl-1.0"
    labels = " ".join(t for k, t in _draw(panels.T2VZ_PT_controlnets) if k == "label")
    assert "only with Allow Pickled Weights" in labels
    # The base model's family unknown (a hub id not in the table): every family's offered.
    xl_scene.t2vz.model = "someone/base"
    models = {model for _, model in _menu(bpy.context)}
    assert {"lllyasviel/sd-controlnet-canny", "diffusers/controlnet-canny-sdxl-1.0"} <= models
