"""Train the built-in shapes models on the synthetic world of ``backend/models/shapes.py``.

    .venv/bin/python -m tools.train_shapes --stage all [--out backend/models/builtin] [--threads 2]

Each stage reads what the one before saved, so one can be re-run alone (``--stage base``,
``--resume`` to continue its saved weights, ``--steps`` to change its length). ``all`` runs
``vae`` and ``base`` in turn, then ``controlnet`` and ``pix2pix`` side by side, one process
each (both only read the base):

* ``vae``: the word-level CLIP tokenizer and an AutoencoderKL (4 latent channels, factor 8),
  written into ``OUT/shapes/{tokenizer,vae}``; the VAE config's ``scaling_factor`` is set so
  scaled latents of the training images have unit standard deviation;
* ``base``: CLIPTextModel + UNet2DConditionModel trained jointly (epsilon prediction, SD's
  noise schedule, 10 % empty prompts for classifier-free guidance) -> ``OUT/shapes``;
* ``controlnet``: ``ControlNetModel.from_unet`` on the frozen base, controlled by
  ``backend.media.controls.canny`` of the rendered frame -> ``OUT/shapes-controlnet``;
* ``pix2pix``: an 8-input-channel UNet initialised from the base (extra channels zero),
  trained on ``shapes.random_edit`` pairs with InstructPix2Pix conditioning dropout
  -> ``OUT/shapes-pix2pix`` (tokenizer, text encoder and VAE are the base's, byte for byte).

``xl`` trains the SDXL architecture in miniature on the same world, from the ``vae`` stage's
autoencoder and tokenizer (SDXL's VAE is SD's architecture; it and the tokenizers are copied
byte for byte), in one command:

* ``base-xl``: CLIPTextModel + CLIPTextModelWithProjection (penultimate hidden states
  concatenated as the cross-attention input, the second encoder's pooled projection as an
  added condition) and a UNet with SDXL's layout: no attention at the full latent resolution,
  stacked transformer blocks below it, linear projections, the ``text_time`` added embedding
  of pooled text and the six size/crop ids -> ``OUT/shapes-xl``;
* ``controlnet-xl``: ``ControlNetModel.from_unet`` on the frozen XL base, the same canny
  controls -> ``OUT/shapes-xl-controlnet``.

Everything is seeded (``--seed``); weights are stored as fp16 safetensors (loading upcasts
to the job's dtype). Nothing here runs in tests or CI: the trained folders are committed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend.media.controls import canny
from backend.models import shapes

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "backend" / "models" / "builtin"
# Rendered training images, reused by the stages (each runs in its own process if asked).
DATA_CACHE = Path(tempfile.gettempdir()) / "t2vz-train-shapes"
# Share of ControlNet training controls drawn from the silhouette (see control_images).
SILHOUETTE_CONTROLS = 0.3
STAGES = ("vae", "base", "controlnet", "pix2pix")
XL_STAGES = ("base-xl", "controlnet-xl")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Words of every prompt and instruction the world makes (see shapes.Scene.prompt, shapes.Edit).
WORLD_WORDS = ("a", "and", "on", "background", "make", "the", *shapes.COLOURS, *shapes.SHAPES)


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedules; defaults train all stages in about 45 minutes on 2 CPU cores."""

    seed: int = 20261122
    image_size: int = 64  # the world is rendered at 64x64; latents are 8x8 (factor 8)
    scenes: int = 6000  # rendered once and shared by vae/base/controlnet (13 ms each)
    edits: int = 4000  # edit pairs for pix2pix (two renders each)
    vae_steps: int = 1800
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6  # tiny KL: a near-deterministic autoencoder, as in SD's VAE
    # The UNet learns colours within ~1000 steps but shape kinds only after several
    # thousand: at 3500 steps squares and triangles came out as blobs (shape match 0.47),
    # 3000 more steps raised it to 0.78 (bench/quality.py --sections fidelity --seeds 64).
    base_steps: int = 10000
    base_batch: int = 32
    base_lr: float = 1e-3
    empty_prompt: float = 0.1  # classifier-free guidance needs the unconditional branch
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023): faster convergence
    ema: float = 0.995
    controlnet_steps: int = 2700
    controlnet_lr: float = 1e-3
    # Half the prompts dropped, as ControlNet's training does (Zhang et al. 2023, Sect. 3.3),
    # so the control alone must explain the image: with 10 % the zero convolutions barely
    # moved and the control had no visible effect.
    controlnet_empty_prompt: float = 0.5
    pix2pix_steps: int = 2800
    pix2pix_lr: float = 4e-4
    drop_text: float = 0.05  # InstructPix2Pix conditioning dropout (Brooks et al. 2023, 3.2)
    drop_image: float = 0.05
    warmup: int = 100
    # SDXL in miniature: the base's step count and recipe (the world and its difficulty are
    # the same; the ControlNet too).
    base_xl_steps: int = 10000
    controlnet_xl_steps: int = 2700


def log(message: str) -> None:
    """Progress line with a wall-clock stamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- tokenizer


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer whose merges make every world word one token (bytes still fall back)."""
    from transformers import CLIPTokenizer

    from backend.models.tiny import _byte_vocab

    chars = _byte_vocab()
    tokens = chars + [c + "</w>" for c in chars]
    known = set(tokens)
    merges: list[str] = []
    # Longer words first: BPE applies the lowest-ranked merge present, so a short word's
    # merges ("a n" of "and") must rank after the chains of words containing them ("orange").
    for word in sorted(set(WORLD_WORDS), key=lambda w: (-len(w), w)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            merge = f"{current} {part}"
            if merge not in merges:
                merges.append(merge)
            current += part
            if current not in known:
                tokens.append(current)
                known.add(current)
    tokens += list(SPECIAL_TOKENS)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77
        )
        for word in WORLD_WORDS:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise RuntimeError(f"tokenizer splits world word {word!r} into {len(ids)} tokens")
        tokenizer.save_pretrained(str(folder))
        # Also the slow tokenizer's files, for transformers versions that do not read
        # tokenizer.json into CLIPTokenizer.
        shutil.copy(vocab_file, folder / "vocab.json")
        shutil.copy(merges_file, folder / "merges.txt")


# --------------------------------------------------------------------------- data


def _render(scene: shapes.Scene) -> np.ndarray:
    return shapes.render(scene)


def render_all(scenes: list[shapes.Scene], workers: int) -> np.ndarray:
    """(n, H, W, 3) uint8 renders; the scenes are drawn beforehand, so order is deterministic."""
    with Pool(workers) as pool:
        return np.stack(pool.map(_render, scenes, chunksize=64))


def cached_render(key: str, scenes: list[shapes.Scene], workers: int) -> np.ndarray:
    """render_all, kept in DATA_CACHE under ``key`` (renders are deterministic) for the
    stages that run in other processes."""
    cache = DATA_CACHE / f"{key}.npy"
    if cache.is_file():
        return np.load(cache)
    images = render_all(scenes, workers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{time.time_ns()}.npy")
    np.save(tmp, images)
    tmp.replace(cache)
    return images


def control_images(scenes: list[shapes.Scene], images: np.ndarray, seed: int) -> np.ndarray:
    """Canny edges of each rendered frame; for a share of the scenes, canny of the bare
    silhouette instead (the render's edges are mostly texture, and a shape of a dark colour
    on a dark background gives none), so clean outlines drive the model too."""
    rng = random.Random(seed + 11)
    out = []
    for scene, image in zip(scenes, images, strict=True):
        if rng.random() < SILHOUETTE_CONTROLS:
            mask = (shapes.silhouette(scene) * 255).round().astype(np.uint8)
            image = np.repeat(mask[:, :, None], 3, axis=2)
        out.append(canny(image))
    return np.stack(out)  # (n, H, W, 3) uint8


@dataclass
class Posteriors:
    """The VAE posteriors of training images: what each step draws its latents from."""

    mean: torch.Tensor  # (n, 4, 8, 8), unscaled
    std: torch.Tensor  # (n, 4, 8, 8)
    scale: float  # the VAE's scaling_factor

    def sample(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scaled latents of the images at ``index``: one draw from each one's posterior."""
        mean = self.mean[index]
        return (mean + self.std[index] * torch.randn(mean.shape, generator=gen)) * self.scale


@dataclass
class SceneInputs:
    """What a stage trained on the rendered scenes starts from."""

    gen: torch.Generator  # the stage's own seeded generator
    scenes: list[shapes.Scene]
    images: np.ndarray  # (n, 64, 64, 3) uint8 renders
    vae: torch.nn.Module  # frozen
    tokenizer: object
    latents: Posteriors


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def make_scenes(seed: int, count: int) -> list[shapes.Scene]:
    """``count`` random scenes from one seeded generator."""
    rng = random.Random(seed)
    return [shapes.random_scene(rng) for _ in range(count)]


def batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random index batches over ``n`` items (a fresh permutation each epoch)."""
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10 %."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class EMA:
    """Exponential moving average of parameters (with the usual warmup of the decay)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).requires_grad_(False)
        self.steps = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Blend the module's current parameters into the average."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for avg, cur in zip(self.shadow.parameters(), module.parameters(), strict=True):
            avg.lerp_(cur.detach(), 1 - decay)


# --------------------------------------------------------------------------- models


def vae_config() -> dict:
    """Four encoder/decoder levels: SD's factor 8 (64x64 -> 8x8), 4 latent channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 64),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def unet_config(in_channels: int, cross_dim: int) -> dict:
    """Cross- and self-attention at both latent resolutions (8x8 and 4x4) and in the middle."""
    return dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
    )


def text_config(tokenizer, cross_dim: int):
    """A two-layer CLIP text encoder; its hidden states are the UNet's cross-attention input
    (both layers: SDXL's encoders give their penultimate state, the first layer's)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cross_dim,
        intermediate_size=cross_dim * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cross_dim,
    )


# SDXL in miniature: two text encoders whose penultimate hidden states are concatenated
# (SDXL Sect. 2.1; 768 + 1280 = 2048 there, 32 + 32 = 64 here) and six size/crop ids of
# ADDED_TIME_DIM each beside the pooled text (Sect. 2.2).
XL_TEXT_DIMS = (32, 32)
ADDED_TIME_DIM = 8


def unet_xl_config(in_channels: int = 4) -> dict:
    """SDXL's UNet layout in miniature: a plain first level (no attention at 8x8, as SDXL has
    none at 128x128), two stacked transformer blocks at 4x4 and in the middle, linear
    projections, and the ``text_time`` added embedding of the pooled text and size ids."""
    return dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),  # diffusers' legacy name: heads per level
        use_linear_projection=True,
        cross_attention_dim=sum(XL_TEXT_DIMS),
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDED_TIME_DIM,
        projection_class_embeddings_input_dim=6 * ADDED_TIME_DIM + XL_TEXT_DIMS[1],
        norm_num_groups=8,
    )


def scheduler_xl():
    """SDXL's scheduler as its model_index names it: Euler on SD's noise schedule (the
    engine runs DDIM on the same betas)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def scheduler():
    """Stable Diffusion 1.x's noise schedule and DDIM settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(n, 77) ids, padded exactly as the engine pads them."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def save_fp16(module: torch.nn.Module, folder: Path) -> None:
    """save_pretrained with fp16 safetensors (a copy; the trained module stays fp32)."""
    copy.deepcopy(module).to(torch.float16).save_pretrained(str(folder), safe_serialization=True)


# --------------------------------------------------------------------------- stages


class Trainer:
    """Runs the stages; holds the rendered data shared between them."""

    def __init__(self, config: TrainConfig, out: Path, workers: int, steps: int = 0):
        self.config = config
        self.out = out
        self.workers = workers
        self.steps = steps  # overrides the stage's step count when > 0 (--steps)
        self._images: np.ndarray | None = None
        self._scenes: list[shapes.Scene] | None = None

    @property
    def base_dir(self) -> Path:
        return self.out / "shapes"

    def data(self) -> tuple[list[shapes.Scene], np.ndarray]:
        """The shared scenes and their 64x64 renders (rendered once per process)."""
        if self._images is None:
            started = time.perf_counter()
            self._scenes = make_scenes(self.config.seed, self.config.scenes)
            key = f"scenes-{self.config.seed}-{self.config.scenes}"
            self._images = cached_render(key, self._scenes, self.workers)
            log(f"rendered {len(self._scenes)} scenes in {time.perf_counter() - started:.0f} s")
        return self._scenes, self._images

    def scene_inputs(self, stage: str) -> SceneInputs:
        """The stage's generator, the shared scenes, the VAE, tokenizer and posteriors."""
        gen = self.seed(stage)
        scenes, images = self.data()
        vae = self.load_vae()
        tokenizer = self.load_tokenizer()
        mean, std = self.posterior(vae, images)
        latents = Posteriors(mean, std, vae.config.scaling_factor)
        return SceneInputs(gen, scenes, images, vae, tokenizer, latents)

    def seed(self, stage: str) -> torch.Generator:
        """Seed torch for a stage (its own offset, so stages re-run alone reproduce)."""
        offset = (STAGES + XL_STAGES).index(stage) + 1
        torch.manual_seed(self.config.seed + offset)
        return torch.Generator().manual_seed(self.config.seed + 100 * offset)

    # ---------------------------------------------------------------- vae
    def train_vae(self, resume: bool = False) -> None:
        """Tokenizer and autoencoder: L1 + MSE reconstruction and a tiny KL term."""
        from diffusers import AutoencoderKL

        cfg = self.config
        gen = self.seed("vae")
        write_tokenizer(self.base_dir / "tokenizer")
        _, images = self.data()
        pixels = to_tensor(images)
        vae = AutoencoderKL(**vae_config())
        if resume:  # continue a previous run's weights (see --resume)
            vae.load_state_dict(self.load_vae().state_dict())
            vae.requires_grad_(True).train()
        steps = self.steps or cfg.vae_steps
        optim = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(50, steps))
        index = batches(len(pixels), cfg.vae_batch, gen)
        started = time.perf_counter()
        for step in range(steps):
            x = pixels[next(index)]
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = vae.decode(z).sample
            loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
            loss = loss + cfg.vae_kl * posterior.kl().mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optim.step()
            sched.step()
            if step % 100 == 0 or step == steps - 1:
                log(f"vae {step}/{steps} loss {loss.item():.4f}")
        vae.eval()
        with torch.no_grad():
            means = torch.cat(
                [vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, 2048, 256)]
            )
        scale = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=round(scale, 5))
        log(f"vae done in {time.perf_counter() - started:.0f} s; scaling_factor {scale:.5f}")
        save_fp16(vae, self.base_dir / "vae")

    # ---------------------------------------------------------------- latents
    def load_vae(self):
        """The saved VAE (fp16 on disk, fp32 here), frozen."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(self.base_dir / "vae"), torch_dtype=torch.float32)
        return vae.requires_grad_(False).eval()

    @torch.no_grad()
    def posterior(self, vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std (n, 4, 8, 8) of uint8 images, unscaled."""
        pixels = to_tensor(images)
        means, stds = [], []
        for i in range(0, len(pixels), 256):
            dist = vae.encode(pixels[i : i + 256]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        return torch.cat(means), torch.cat(stds)

    def load_tokenizer(self):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(self.base_dir / "tokenizer"))

    # ---------------------------------------------------------------- base
    def train_base(self, resume: bool = False) -> None:
        """Text encoder and UNet jointly: epsilon prediction on scaled VAE latents."""
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        cfg = self.config
        inputs = self.scene_inputs("base")
        gen, scenes, vae, tokenizer = inputs.gen, inputs.scenes, inputs.vae, inputs.tokenizer
        prompts = [s.prompt() for s in scenes]
        ids = tokenize(tokenizer, prompts)
        empty = tokenize(tokenizer, [""])[0]
        cross_dim = 64
        text_encoder = CLIPTextModel(text_config(tokenizer, cross_dim))
        unet = UNet2DConditionModel(**unet_config(4, cross_dim))
        if resume:  # continue a previous run's (EMA) weights (see --resume)
            saved_unet, saved_text = self.load_base()
            unet.load_state_dict(saved_unet.state_dict())
            text_encoder.load_state_dict(saved_text.state_dict())
            unet.requires_grad_(True)
            text_encoder.requires_grad_(True)
        log(
            f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
            f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M"
        )
        params = list(unet.parameters()) + list(text_encoder.parameters())
        modules = torch.nn.ModuleList([unet, text_encoder])
        ema = EMA(modules, cfg.ema)

        def step_fn(index: torch.Tensor) -> torch.Tensor:
            latents = inputs.latents.sample(index, gen)
            tokens = ids[index].clone()
            drop = torch.rand(len(index), generator=gen) < cfg.empty_prompt
            tokens[drop] = empty
            text = text_encoder(tokens)[0]
            return self.diffusion_loss(unet, latents, text, gen)

        steps = self.steps or cfg.base_steps
        self.fit("base", modules, params, step_fn, len(scenes), steps, cfg.base_lr, gen, ema)
        unet, text_encoder = ema.shadow[0], ema.shadow[1]
        sched = scheduler()
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
            self._replace(Path(tmp), self.base_dir, keep=("vae", "tokenizer"))

    def diffusion_loss(
        self,
        unet,
        latents: torch.Tensor,
        text: torch.Tensor,
        gen: torch.Generator,
        extra: torch.Tensor | None = None,
        **unet_kwargs,
    ) -> torch.Tensor:
        """Min-SNR-weighted epsilon MSE at uniformly drawn timesteps (SD's schedule)."""
        alphas = self._alphas()
        t = torch.randint(0, 1000, (len(latents),), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        model_input = noisy if extra is None else torch.cat([noisy, extra], dim=1)
        pred = unet(model_input, t, encoder_hidden_states=text, **unet_kwargs).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=self.config.snr_gamma) / snr
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    def _alphas(self) -> torch.Tensor:
        if not hasattr(self, "_alphas_cache"):
            self._alphas_cache = scheduler().alphas_cumprod.float()
        return self._alphas_cache

    def fit(self, name, modules, params, step_fn, n, steps, lr, gen, ema=None) -> None:
        """AdamW with warmup and cosine decay over ``steps`` batches of ``step_fn``."""
        cfg = self.config
        batch = cfg.base_batch
        optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg.warmup, steps))
        index = batches(n, batch, gen)
        modules.train()
        started = time.perf_counter()
        running = None
        for step in range(steps):
            loss = step_fn(next(index))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            if ema is not None:
                ema.update(modules)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 100 == 0 or step == steps - 1:
                elapsed = time.perf_counter() - started
                log(f"{name} {step}/{steps} loss {running:.4f} ({elapsed:.0f} s)")
        modules.eval()

    def _replace(self, staged: Path, target: Path, keep: tuple[str, ...] = ()) -> None:
        """Move a staged folder into place, keeping ``keep`` subfolders of the target."""
        target.mkdir(parents=True, exist_ok=True)
        for item in staged.iterdir():
            if item.name in keep:
                continue
            dest = target / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            shutil.move(str(item), str(dest))

    def load_base(self):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(
            str(self.base_dir / "unet"), torch_dtype=torch.float32
        )
        text = CLIPTextModel.from_pretrained(
            str(self.base_dir / "text_encoder"), torch_dtype=torch.float32
        )
        return unet.requires_grad_(False).eval(), text.requires_grad_(False).eval()

    # ---------------------------------------------------------------- controlnet
    def train_controlnet(self, resume: bool = False) -> None:
        """ControlNet on the frozen base; control = canny edges of the rendered frame."""
        from diffusers import ControlNetModel

        cfg = self.config
        inputs = self.scene_inputs("controlnet")
        gen, scenes, tokenizer = inputs.gen, inputs.scenes, inputs.tokenizer
        unet, text_encoder = self.load_base()
        controls = torch.from_numpy(control_images(scenes, inputs.images, cfg.seed)).permute(
            0, 3, 1, 2
        )
        with torch.no_grad():
            texts = text_encoder(tokenize(tokenizer, [s.prompt() for s in scenes]))[0]
            empty = text_encoder(tokenize(tokenizer, [""]))[0][0]
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(16, 32, 64, 128)
        )
        if resume:  # continue a previous run's weights (see --resume)
            saved = ControlNetModel.from_pretrained(
                str(self.out / "shapes-controlnet"), torch_dtype=torch.float32
            )
            controlnet.load_state_dict(saved.state_dict())
        controlnet.train()

        empty_share = cfg.controlnet_empty_prompt

        def step_fn(index: torch.Tensor) -> torch.Tensor:
            latents = inputs.latents.sample(index, gen)
            text = texts[index].clone()
            text[torch.rand(len(index), generator=gen) < empty_share] = empty
            cond = controls[index].float() / 255  # (batch, 3, H, W) in [0, 1], as the engine
            return self.controlnet_loss(unet, controlnet, latents, text, cond, gen)

        modules = torch.nn.ModuleList([controlnet])
        self.fit(
            "controlnet",
            modules,
            list(controlnet.parameters()),
            step_fn,
            len(scenes),
            self.steps or cfg.controlnet_steps,
            cfg.controlnet_lr,
            gen,
        )
        target = self.out / "shapes-controlnet"
        if target.exists():
            shutil.rmtree(target)
        save_fp16(controlnet, target)

    def controlnet_loss(
        self, unet, controlnet, latents, text, cond, gen, **unet_kwargs
    ) -> torch.Tensor:
        """Epsilon MSE (min-SNR weighted) of the frozen UNet plus the ControlNet residuals
        (``unet_kwargs`` go to both: SDXL's ``added_cond_kwargs``)."""
        alphas = self._alphas()
        t = torch.randint(0, 1000, (len(latents),), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        down, mid = controlnet(
            noisy,
            t,
            encoder_hidden_states=text,
            controlnet_cond=cond,
            return_dict=False,
            **unet_kwargs,
        )
        pred = unet(
            noisy,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **unet_kwargs,
        ).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=self.config.snr_gamma) / snr
        return (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()

    # ---------------------------------------------------------------- pix2pix
    def train_pix2pix(self, resume: bool = False) -> None:
        """InstructPix2Pix: 8-channel UNet from the base, edit pairs, conditioning dropout."""
        from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

        cfg = self.config
        gen = self.seed("pix2pix")
        rng = random.Random(cfg.seed + 5)
        edits = [shapes.random_edit(rng) for _ in range(cfg.edits)]
        started = time.perf_counter()
        key = f"edits-{cfg.seed}-{cfg.edits}"
        before = cached_render(f"{key}-before", [e.before for e in edits], self.workers)
        after = cached_render(f"{key}-after", [e.after for e in edits], self.workers)
        log(f"rendered {len(edits)} edit pairs in {time.perf_counter() - started:.0f} s")
        vae = self.load_vae()
        tokenizer = self.load_tokenizer()
        base_unet, text_encoder = self.load_base()
        posteriors = Posteriors(*self.posterior(vae, after), vae.config.scaling_factor)
        image_latents, _ = self.posterior(vae, before)  # the posterior mode, unscaled (engine)
        with torch.no_grad():
            texts = text_encoder(tokenize(tokenizer, [e.instruction for e in edits]))[0]
            empty = text_encoder(tokenize(tokenizer, [""]))[0][0]
        # The base UNet's settings, not its loading history (_name_or_path: a training folder).
        config = {k: v for k, v in base_unet.config.items() if not k.startswith("_")}
        config["in_channels"] = 8
        unet = UNet2DConditionModel.from_config(config)
        state = base_unet.state_dict()
        weight = state["conv_in.weight"]
        state["conv_in.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)
        unet.load_state_dict(state)
        if resume:  # continue a previous run's (EMA) weights (see --resume)
            saved = UNet2DConditionModel.from_pretrained(
                str(self.out / "shapes-pix2pix" / "unet"), torch_dtype=torch.float32
            )
            unet.load_state_dict(saved.state_dict())
        modules = torch.nn.ModuleList([unet])
        ema = EMA(modules, cfg.ema)

        def step_fn(index: torch.Tensor) -> torch.Tensor:
            latents = posteriors.sample(index, gen)
            text = texts[index].clone()
            image = image_latents[index].clone()
            r = torch.rand(len(index), generator=gen)
            # Paper 3.2: drop the text only, the image only, or both (5 % each).
            drop_text = r < cfg.drop_text
            drop_image = (r >= cfg.drop_text) & (r < cfg.drop_text + cfg.drop_image)
            drop_both = (r >= cfg.drop_text + cfg.drop_image) & (
                r < 2 * (cfg.drop_text + cfg.drop_image) - cfg.drop_text
            )
            text[drop_text | drop_both] = empty
            image[drop_image | drop_both] = 0
            return self.diffusion_loss(unet, latents, text, gen, extra=image)

        self.fit(
            "pix2pix",
            modules,
            list(unet.parameters()),
            step_fn,
            len(edits),
            self.steps or cfg.pix2pix_steps,
            cfg.pix2pix_lr,
            gen,
            ema,
        )
        unet = ema.shadow[0]
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        target = self.out / "shapes-pix2pix"
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            save_fp16(unet, Path(tmp) / "unet")
            if target.exists():
                shutil.rmtree(target)
            shutil.move(tmp, target)
            Path(tmp).mkdir()  # TemporaryDirectory removes it on exit
        # Byte-identical copies of the base's shared parts (git stores them once).
        for sub in ("tokenizer", "text_encoder", "vae"):
            shutil.rmtree(target / sub)
            shutil.copytree(self.base_dir / sub, target / sub)

    # ---------------------------------------------------------------- SDXL in miniature
    @property
    def xl_dir(self) -> Path:
        return self.out / "shapes-xl"

    def xl_text_encoders(self, tokenizer):
        """Fresh CLIPTextModel and CLIPTextModelWithProjection of XL_TEXT_DIMS widths."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        first = CLIPTextModel(text_config(tokenizer, XL_TEXT_DIMS[0]))
        second = CLIPTextModelWithProjection(text_config(tokenizer, XL_TEXT_DIMS[1]))
        return first, second

    @staticmethod
    def encode_xl(first, second, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 77, 64) penultimate states of both encoders, concatenated, and (n, 32) pooled
        projection of the second: what the engine's SDXL family feeds the UNet."""
        out_1 = first(ids, output_hidden_states=True)
        out_2 = second(ids, output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return hidden, out_2.text_embeds

    def xl_conditions(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """``added_cond_kwargs``: the pooled text and the size/crop ids of an uncropped
        64x64 picture (the engine's ids at the world's size)."""
        size = self.config.image_size
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": ids.expand(len(pooled), -1)}

    def train_base_xl(self, resume: bool = False) -> None:
        """Both text encoders and the XL UNet jointly; an empty prompt is all-zero embeddings
        (the engine's ``force_zeros_for_empty_prompt`` for SDXL's negative prompt)."""
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

        cfg = self.config
        inputs = self.scene_inputs("base-xl")
        gen, scenes, vae, tokenizer = inputs.gen, inputs.scenes, inputs.vae, inputs.tokenizer
        ids = tokenize(tokenizer, [s.prompt() for s in scenes])
        first, second = self.xl_text_encoders(tokenizer)
        unet = UNet2DConditionModel(**unet_xl_config())
        if resume:  # continue a previous run's (EMA) weights (see --resume)
            saved = self.load_base_xl()
            for module, weights in zip((unet, first, second), saved, strict=True):
                module.load_state_dict(weights.state_dict())
                module.requires_grad_(True)
        log(
            f"xl unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
            f"text encoders {sum(p.numel() for p in first.parameters()) / 1e6:.2f} M + "
            f"{sum(p.numel() for p in second.parameters()) / 1e6:.2f} M"
        )
        modules = torch.nn.ModuleList([unet, first, second])
        ema = EMA(modules, cfg.ema)

        def step_fn(index: torch.Tensor) -> torch.Tensor:
            latents = inputs.latents.sample(index, gen)
            text, pooled = self.encode_xl(first, second, ids[index])
            keep = (torch.rand(len(index), generator=gen) >= cfg.empty_prompt).float()
            text, pooled = text * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
            added = self.xl_conditions(pooled)
            return self.diffusion_loss(unet, latents, text, gen, added_cond_kwargs=added)

        steps = self.steps or cfg.base_xl_steps
        params = list(modules.parameters())
        self.fit("base-xl", modules, params, step_fn, len(scenes), steps, cfg.base_lr, gen, ema)
        unet, first, second = ema.shadow
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=first,
            text_encoder_2=second,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler_xl(),
            force_zeros_for_empty_prompt=True,
        )
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
            self._replace(Path(tmp), self.xl_dir)
        # Byte-identical copies of the SD 1.x base's autoencoder and tokenizer.
        for source, sub in (
            ("vae", "vae"),
            ("tokenizer", "tokenizer"),
            ("tokenizer", "tokenizer_2"),
        ):
            shutil.rmtree(self.xl_dir / sub)
            shutil.copytree(self.base_dir / source, self.xl_dir / sub)

    def load_base_xl(self):
        """The saved XL UNet and text encoders (fp32), frozen."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        def frozen(module):
            return module.requires_grad_(False).eval()

        folder = self.xl_dir
        return (
            frozen(UNet2DConditionModel.from_pretrained(str(folder / "unet"))),
            frozen(CLIPTextModel.from_pretrained(str(folder / "text_encoder"))),
            frozen(CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"))),
        )

    def train_controlnet_xl(self, resume: bool = False) -> None:
        """ControlNet on the frozen XL base; the SD 1.x ControlNet's controls and recipe."""
        from diffusers import ControlNetModel

        cfg = self.config
        inputs = self.scene_inputs("controlnet-xl")
        gen, scenes, tokenizer = inputs.gen, inputs.scenes, inputs.tokenizer
        unet, first, second = self.load_base_xl()
        unet, first, second = unet.float(), first.float(), second.float()
        controls = torch.from_numpy(control_images(scenes, inputs.images, cfg.seed)).permute(
            0, 3, 1, 2
        )
        with torch.no_grad():
            texts, pooled = self.encode_xl(
                first, second, tokenize(tokenizer, [s.prompt() for s in scenes])
            )
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(16, 32, 64, 128)
        )
        target = self.out / "shapes-xl-controlnet"
        if resume:  # continue a previous run's weights (see --resume)
            saved = ControlNetModel.from_pretrained(str(target), torch_dtype=torch.float32)
            controlnet.load_state_dict(saved.state_dict())
        controlnet.train()

        def step_fn(index: torch.Tensor) -> torch.Tensor:
            latents = inputs.latents.sample(index, gen)
            keep = (torch.rand(len(index), generator=gen) >= cfg.controlnet_empty_prompt).float()
            text = texts[index] * keep.view(-1, 1, 1)
            added = self.xl_conditions(pooled[index] * keep.view(-1, 1))
            cond = controls[index].float() / 255  # (batch, 3, H, W) in [0, 1], as the engine
            return self.controlnet_loss(
                unet, controlnet, latents, text, cond, gen, added_cond_kwargs=added
            )

        self.fit(
            "controlnet-xl",
            torch.nn.ModuleList([controlnet]),
            list(controlnet.parameters()),
            step_fn,
            len(scenes),
            self.steps or cfg.controlnet_xl_steps,
            cfg.controlnet_lr,
            gen,
        )
        if target.exists():
            shutil.rmtree(target)
        save_fp16(controlnet, target)


def main(argv: list[str] | None = None) -> None:
    """Command line: train the chosen stages into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stage",
        choices=(*STAGES, "all", *XL_STAGES, "xl"),
        default="all",
        help="all: the SD 1.x models; xl: the SDXL ones (base-xl, then controlnet-xl)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (use 1 on a busy machine: two OpenMP threads that wait for "
        "each other there made each step ~10x slower)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes rendering the data")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the stage's saved weights (a fresh optimiser and schedule)",
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="steps of a single stage (default: its config's)"
    )
    args = parser.parse_args(argv)
    if args.stage in ("all", "xl") and (args.resume or args.steps):
        parser.error("--resume and --steps are for a single --stage")
    if args.steps < 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(TrainConfig(seed=args.seed), args.out, args.workers, args.steps)
    started_all = time.perf_counter()
    serial = {"all": STAGES[:2], "xl": XL_STAGES}.get(args.stage, (args.stage,))
    for stage in serial:
        started = time.perf_counter()
        getattr(trainer, f"train_{stage.replace('-', '_')}")(resume=args.resume)
        log(f"stage {stage} done in {time.perf_counter() - started:.0f} s")
    if args.stage == "all":
        train_side_by_side(STAGES[2:], args)
    if args.stage in ("all", "xl"):
        log(f"{args.stage} stages done in {time.perf_counter() - started_all:.0f} s")


def train_side_by_side(stages: tuple[str, ...], args: argparse.Namespace) -> None:
    """Train stages that only read the base (controlnet, pix2pix) in parallel processes.

    One process per stage with an equal share of the threads: torch's threads scale poorly
    on models this small (2 threads ran a base step 1.34x faster than 1), so two 1-thread
    processes finish both stages sooner than one 2-thread process running them in turn.
    """
    started = time.perf_counter()
    threads = max(1, args.threads // len(stages))
    workers = max(1, args.workers // len(stages))
    children = {
        stage: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.train_shapes",
                "--stage",
                stage,
                "--out",
                str(args.out),
                "--seed",
                str(args.seed),
                "--threads",
                str(threads),
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
        )
        for stage in stages
    }
    failed = [stage for stage, child in children.items() if child.wait() != 0]
    if failed:
        raise SystemExit(f"training stage(s) {', '.join(failed)} failed (see their log above)")
    log(f"stages {', '.join(stages)} done side by side in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
