"""The trained built-in shapes models: shipped weights, loading and generating through the
real loader and engine. (Picture quality is measured by bench/quality.py; these tests check
that the committed models are the documented ones and run end to end.)"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from backend.models.tiny import SHAPES_KINDS, SHIPPED_DIR, ensure_builtin

REPO = Path(__file__).resolve().parent.parent
SUMS = SHIPPED_DIR / "SHA256SUMS"


def documented_sums(text: str) -> dict[str, str]:
    """``path -> sha256`` from lines ``<64 hex>  <path>`` (sha256sum's format)."""
    return dict(
        (m.group(2), m.group(1))
        for m in re.finditer(r"^`?([0-9a-f]{64})\s+([\w./-]+\.safetensors)`?$", text, re.M)
    )


def test_every_weight_file_matches_its_documented_sha256() -> None:
    listed = documented_sums(SUMS.read_text(encoding="utf-8"))
    present = {
        str(p.relative_to(SHIPPED_DIR)): p for p in sorted(SHIPPED_DIR.rglob("*.safetensors"))
    }
    assert set(listed) == set(present)
    for name, path in present.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[name], name


def test_readme_lists_the_same_sha256() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert documented_sums(readme) == documented_sums(SUMS.read_text(encoding="utf-8"))


def test_committed_weights_stay_small() -> None:
    # Identical files (the pix2pix folder's tokenizer, text encoder and VAE) are one git blob.
    blobs = {p.read_bytes() for p in SHIPPED_DIR.rglob("*.safetensors")}
    assert sum(len(b) for b in blobs) < 30 * 2**20


def test_shipped_configs_carry_no_loading_history() -> None:
    """Configs hold model settings only: no ``_name_or_path`` (the training machine's
    folder) or other machine path, which from_config would carry into users' saved copies."""
    import json

    for path in sorted(SHIPPED_DIR.rglob("config.json")):
        config = json.loads(path.read_text(encoding="utf-8"))
        assert "_name_or_path" not in config, path
        paths = [v for v in config.values() if isinstance(v, str) and v.startswith("/")]
        assert not paths, (path, paths)


# The kinds trained and committed so far (ControlNet and pix2pix land after the base).
SHIPPED = tuple(k for k in SHAPES_KINDS if (SHIPPED_DIR / k).is_dir())


def _shipped(kind: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(kind not in SHIPPED, reason=f"{kind} not trained yet")


def test_the_base_model_is_shipped() -> None:
    assert "shapes" in SHIPPED


@pytest.mark.parametrize("kind", SHIPPED)
def test_builtin_names_resolve_to_the_shipped_folders(kind: str) -> None:
    assert ensure_builtin(f"builtin:{kind}") == SHIPPED_DIR / kind


def test_unknown_builtin_lists_every_builtin() -> None:
    from backend.models.loading import ModelLoadError, resolve_source

    with pytest.raises(ModelLoadError) as caught:
        resolve_source("builtin:shape")
    for kind in ("tiny", "tiny-controlnet", "tiny-pix2pix", *SHAPES_KINDS):
        assert f"builtin:{kind}" in str(caught.value)


def test_world_words_are_single_tokens() -> None:
    from transformers import CLIPTokenizer

    from tools.train_shapes import WORLD_WORDS

    tokenizer = CLIPTokenizer.from_pretrained(str(SHIPPED_DIR / "shapes" / "tokenizer"))
    ids = tokenizer("make the circle green on a purple background").input_ids
    assert len(ids) == 8 + 2  # one token a word, plus start and end
    for word in WORLD_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def border_colour(frame) -> str:
    """The palette colour (full or shaded tone) most of the frame's 4-pixel border is nearest."""
    import numpy as np

    from backend.models.shapes import PALETTE, SHADE

    names = list(PALETTE)
    tones = np.array([PALETTE[c] for c in names] + [[SHADE * v for v in PALETTE[c]] for c in names])
    border = np.concatenate([frame[:4].reshape(-1, 3), frame[-4:].reshape(-1, 3)]).astype(float)
    nearest = ((border[:, None] - tones[None]) ** 2).sum(-1).argmin(-1) % len(names)
    return names[np.bincount(nearest).argmax()]


# Text-to-image bases and their ControlNets, by family (SD 1.x, SDXL in miniature).
BASES = [pytest.param(k, marks=_shipped(k)) for k in ("shapes", "shapes-xl")]
CONTROLNET_PAIRS = [
    pytest.param(base, cn, marks=_shipped(cn))
    for base, cn in (("shapes", "shapes-controlnet"), ("shapes-xl", "shapes-xl-controlnet"))
]


def test_the_xl_models_are_sdxl_in_miniature() -> None:
    if "shapes-xl" not in SHIPPED:
        pytest.skip("shapes-xl not trained yet")
    from backend.models.loading import load_base_model, load_controlnet

    base = load_base_model("builtin:shapes-xl")
    assert base.family.key == "sdxl"
    assert base.text_encoder_2 is not None
    # SDXL's layout: no attention at the full latent resolution, stacked blocks below.
    assert base.unet.config.down_block_types[0] == "DownBlock2D"
    assert base.unet.config.addition_embed_type == "text_time"
    controlnet = load_controlnet("builtin:shapes-xl-controlnet")
    assert controlnet.config.addition_embed_type == "text_time"


@pytest.mark.parametrize("kind", BASES)
def test_base_model_generates_the_prompted_background(kind: str) -> None:
    from backend.engine.pipeline import TextToVideoZero
    from backend.models.loading import load_base_model
    from backend.protocol import resolve_t0_t1

    engine = TextToVideoZero(load_base_model(f"builtin:{kind}"))
    t0, t1 = resolve_t0_t1(20)
    for background in ("blue", "yellow"):
        latents = engine(
            prompt=f"a red circle on a {background} background",
            num_frames=2,
            height=64,
            width=64,
            seed=1,
            num_inference_steps=20,
            guidance_scale=7.5,
            t0=t0,
            t1=t1,
        )
        frames = engine.decode(latents).numpy()
        assert frames.shape == (2, 64, 64, 3)
        # Quick gate before landing: the background colour matched the prompt in 20 of 24
        # seeds (1000 steps); this asks for it in both frames of one fixed seed per prompt.
        assert [border_colour(f) for f in frames] == [background, background]


def palette_mask(frame, colour: str):
    """Pixels whose nearest palette tone (full or shaded) belongs to ``colour``."""
    import numpy as np

    from backend.models.shapes import PALETTE, SHADE

    names = list(PALETTE)
    tones = np.array([PALETTE[c] for c in names] + [[SHADE * v for v in PALETTE[c]] for c in names])
    pixels = frame.reshape(-1, 3).astype(float)
    nearest = ((pixels[:, None] - tones[None]) ** 2).sum(-1).argmin(-1) % len(names)
    return (nearest == names.index(colour)).reshape(frame.shape[:2])


@pytest.mark.parametrize(("base", "kind"), CONTROLNET_PAIRS)
def test_controlnet_video_on_a_moving_shape(base: str, kind: str) -> None:
    import torch

    from backend.engine.pipeline import ControlInput, TextToVideoZero
    from backend.media.controls import canny
    from backend.models import shapes
    from backend.models.loading import load_base_model, load_controlnet

    controlnet = load_controlnet(f"builtin:{kind}")
    assert controlnet.config.cross_attention_dim == 64
    engine = TextToVideoZero(load_base_model(f"builtin:{base}"), [controlnet])
    scene = shapes.Scene("blue", "checks", (shapes.Shape("square", "white", 0.3, 0.5, 0.2),))
    video = shapes.render_video(scene, 2, velocity=(0.2, 0.0))
    controls = {k: torch.from_numpy(canny(frame)).permute(2, 0, 1) for k, frame in enumerate(video)}
    latents = engine(
        prompt=scene.prompt(),
        num_frames=2,
        height=64,
        width=64,
        seed=0,
        num_inference_steps=10,
        guidance_scale=7.5,
        motion_dynamics=False,
        controls=[ControlInput(controlnet, controls, weight=1.0)],
    )
    frames = engine.decode(latents).numpy()
    assert frames.shape == (2, 64, 64, 3)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize(("base", "kind"), CONTROLNET_PAIRS)
def test_controlnet_puts_the_shape_where_the_control_has_it(base: str, kind: str) -> None:
    import numpy as np
    import torch

    from backend.engine.pipeline import ControlInput, TextToVideoZero
    from backend.media.controls import canny
    from backend.models import shapes
    from backend.models.loading import load_base_model, load_controlnet

    controlnet = load_controlnet(f"builtin:{kind}")
    engine = TextToVideoZero(load_base_model(f"builtin:{base}"), [controlnet])
    centres = []
    for x in (0.28, 0.72):
        scene = shapes.Scene("blue", "checks", (shapes.Shape("square", "white", x, 0.5, 0.2),))
        control = torch.from_numpy(canny(shapes.render(scene))).permute(2, 0, 1)
        latents = engine(
            prompt=scene.prompt(),
            num_frames=1,
            height=64,
            width=64,
            seed=0,
            num_inference_steps=20,
            guidance_scale=7.5,
            motion_dynamics=False,
            controls=[ControlInput(controlnet, {0: control}, weight=1.0)],
        )
        white = palette_mask(engine.decode(latents)[0].numpy(), "white")
        assert white.sum() > 100  # the square is there
        centres.append(np.nonzero(white)[1].mean())
    # The control's square is centred at column 18 or 46. Quick check before committing:
    # pixels of the prompt's shape colour overlapped the control's silhouette with IoU 0.61
    # on average over 12 random scenes (0.25 before the second training run, whose images
    # did not move with the control); here the white pixels' mean column must follow it.
    assert centres[0] < 28 < 36 < centres[1], centres


@pytest.mark.skipif("shapes-pix2pix" not in SHIPPED, reason="pix2pix not trained yet")
def test_pix2pix_recolours_the_background() -> None:
    import torch

    from backend.engine.pipeline import TextToVideoZero
    from backend.models import shapes
    from backend.models.loading import load_base_model

    engine = TextToVideoZero(load_base_model("builtin:shapes-pix2pix", pix2pix=True))
    scene = shapes.Scene("blue", "stripes", (shapes.Shape("circle", "red", 0.5, 0.5, 0.2),))
    source = torch.from_numpy(shapes.render(scene)).permute(2, 0, 1)
    latents = engine(
        prompt="make the background yellow",
        num_frames=1,
        height=64,
        width=64,
        seed=0,
        num_inference_steps=20,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        motion_dynamics=False,
        image={0: source},
    )
    frame = engine.decode(latents)[0].numpy()
    # MEASURED: background edits gave 0.59 to 0.94 palette agreement with the edited render
    # over 7 random edits (the shape often loses its colour, so only the border is asked).
    assert border_colour(source.permute(1, 2, 0).numpy()) == "blue"
    assert border_colour(frame) == "yellow"
