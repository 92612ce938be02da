"""Speed and memory of text to video on the SDXL architecture, random weights, side by side.

The models are SDXL base's architecture from its configs (``bench/configs/sdxl``: UNet with
transformer depths 1/2/10 and the size/pooled-text embedding, CLIP-L and OpenCLIP-bigG text
encoders, SDXL's VAE) with random weights: nothing is downloaded. ``--scale k`` divides
every width by k (same depths and topology, about 1/k^2 of the parameters) for a machine
that cannot hold the 3.5 B float32 parameters (14 GB); ``--scale 1`` is SDXL itself.

Printed, measured in one run with the order rotated each round:

* ``ours``: the engine as the runner drives it (generate, decode in slices of 4 frames);
* ``diffusers``: TextToVideoZeroSDXLPipeline built from the same components, DDIM, the
  same t0/t1, ``output_type="np"`` (its decode included);
* ``floor``: the UNet calls the job needs (CFG batches, added conditions), run bare with
  default attention, plus the same VAE decoding.

and, each in a fresh process, the peak resident memory of ours at every ``--frames`` count
(chunks of ``--chunk-size``).

    .venv/bin/python -m bench.sdxl --scale 4 --size 128 --frames 8 --steps 4 --threads 1
    .venv/bin/python -m bench.sdxl --scale 4 --size 128 --memory 8 64 --steps 4 --threads 1
    python -m bench.sdxl --scale 1 --size 1024 --frames 8 --steps 30 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from backend.engine.pipeline import TextToVideoZero, plan_generation
from backend.models.families import added_conditions, encode_text
from backend.models.loading import TORCH_DTYPES, BaseModel, _place, resolve_device
from backend.models.tiny import write_tiny_tokenizer
from backend.protocol import resolve_t0_t1

from .measure import MIB, Measurement, device_name, interleaved, measure_once, peak_rss, warm_up

CONFIGS = Path(__file__).resolve().parent / "configs" / "sdxl"
PROMPT = "a horse galloping on a street"
GUIDANCE = 7.5
DECODE_SLICE = 4


def _config(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / name / "config.json").read_text(encoding="utf-8"))


def _narrow(width: int, scale: int) -> int:
    """A width divided by ``scale`` (at least 8)."""
    return max(8, width // scale)


def scaled_configs(scale: int) -> dict[str, dict[str, Any]]:
    """SDXL's configs with every width divided by ``scale`` (heads and depths kept)."""
    unet, vae = _config("unet"), _config("vae")
    text, text_2 = _config("text_encoder"), _config("text_encoder_2")
    if scale == 1:
        return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2}
    for config in (text, text_2):
        config["hidden_size"] = _narrow(config["hidden_size"], scale)
        config["intermediate_size"] = _narrow(config["intermediate_size"], scale)
        config["projection_dim"] = _narrow(config["projection_dim"], scale)
    groups = 32 // scale if 32 % scale == 0 else 8
    unet.update(
        block_out_channels=[_narrow(c, scale) for c in unet["block_out_channels"]],
        cross_attention_dim=text["hidden_size"] + text_2["hidden_size"],
        addition_time_embed_dim=_narrow(unet["addition_time_embed_dim"], scale),
        norm_num_groups=groups,
    )
    unet["projection_class_embeddings_input_dim"] = (
        6 * unet["addition_time_embed_dim"] + text_2["projection_dim"]
    )
    vae["block_out_channels"] = [_narrow(c, scale) for c in vae["block_out_channels"]]
    vae["norm_num_groups"] = groups
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2}


def build_base(scale: int, device: torch.device, dtype: torch.dtype) -> BaseModel:
    """SDXL-architecture components with random weights (seeded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    configs = scaled_configs(scale)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp) / "l")
        write_tiny_tokenizer(Path(tmp) / "g", pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(tmp) / "l"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(Path(tmp) / "g"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig.from_dict(configs["text_encoder_2"])
    )
    scheduler = json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    return BaseModel(
        tokenizer=tokenizer,
        text_encoder=_place(text_encoder, device, dtype),
        unet=_place(UNet2DConditionModel.from_config(configs["unet"]), device, dtype),
        vae=_place(AutoencoderKL.from_config(configs["vae"]), device, dtype),
        scheduler_config={**scheduler, "clip_sample": False, "set_alpha_to_one": False},
        source=f"sdxl-random-scale{scale}",
        device=device,
        dtype=dtype,
        tokenizer_2=tokenizer_2,
        text_encoder_2=_place(text_encoder_2, device, dtype),
    )


def ours(base: BaseModel, args: argparse.Namespace, frames: int) -> Any:
    """Our engine as the runner drives it: generate, then decode in slices."""
    t0, t1 = resolve_t0_t1(args.steps)

    def run() -> None:
        engine = TextToVideoZero(base)
        latents = engine(
            prompt=PROMPT,
            num_frames=frames,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            seed=0,
            chunk_size=args.chunk_size,
            t0=t0,
            t1=t1,
        )
        for start in range(0, frames, DECODE_SLICE):
            engine.decode(latents[start : start + DECODE_SLICE])

    return run


def diffusers_t2vz(base: BaseModel, args: argparse.Namespace) -> Any:
    """TextToVideoZeroSDXLPipeline on the same components, DDIM, the same t0/t1."""
    from diffusers import DDIMScheduler, TextToVideoZeroSDXLPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    components = base.pipeline_components()
    components.pop("force_zeros_for_empty_prompt")
    pipe = TextToVideoZeroSDXLPipeline(**components)
    pipe.scheduler = DDIMScheduler.from_config(base.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    t0, t1 = resolve_t0_t1(args.steps)
    processors = dict(pipe.unet.attn_processors)

    def run() -> None:
        pipe(
            PROMPT,
            video_length=args.frames,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            t0=t0,
            t1=t1,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        pipe.unet.set_attn_processor(dict(processors))  # it leaves its own ones installed

    return run


def floor(base: BaseModel, args: argparse.Namespace) -> Any:
    """The job's UNet calls bare (default attention, CFG batches with the added conditions)
    and the same VAE decoding: what any implementation of the job must run."""
    t0, t1 = resolve_t0_t1(args.steps)
    plan = plan_generation(range(args.frames), args.chunk_size, args.steps, True, t0, t1)
    latent = args.size // base.vae_scale_factor
    text = encode_text(base, ["", PROMPT], negatives=[True, False])
    added = added_conditions(text, args.size, args.size, base.device, base.dtype)
    gen = torch.Generator().manual_seed(1)
    final = torch.randn(args.frames, 4, latent, latent, generator=gen).to(base.device, base.dtype)
    t = torch.tensor(500, device=base.device)
    inputs = {}
    for n in sorted(set(plan.model_calls())):
        x = torch.randn(2 * n, 4, latent, latent, generator=gen).to(base.device, base.dtype)
        inputs[n] = (
            x,
            text.embeds.repeat_interleave(n, dim=0),  # (2 * n, 77, dim)
            {k: v.repeat_interleave(n, dim=0) for k, v in added.items()},
        )
    scale = base.vae.config.scaling_factor

    def run() -> None:
        for n in plan.model_calls():
            x, embeds, cond = inputs[n]
            base.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=cond, return_dict=False)
        for start in range(0, args.frames, DECODE_SLICE):
            base.vae.decode(final[start : start + DECODE_SLICE] / scale, return_dict=False)

    return run


def memory_child(spec: dict[str, Any]) -> dict[str, float]:
    """One run of ours at ``spec["frames"]`` frames in this fresh process: peak RSS."""
    torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(**spec["args"])
    device = resolve_device(args.device)
    base = build_base(args.scale, device, TORCH_DTYPES[args.dtype])
    result = Measurement()
    measure_once(ours(base, args, spec["frames"]), device, result)
    return {
        "growth_mib": result.growth[0] / MIB,
        # on CUDA the peak of allocated GPU memory, else the process's resident peak
        "process_peak_mib": result.peak[0] / MIB if device.type == "cuda" else peak_rss() / MIB,
        "seconds": result.seconds[0],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4, help="divide every width by this")
    parser.add_argument("--size", type=int, default=128, help="pixels (square)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--memory", type=int, nargs="*", help="frame counts for peak memory")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = TORCH_DTYPES[args.dtype]
    base = build_base(args.scale, device, dtype)
    params = sum(p.numel() for m in (base.unet, base.text_encoder, base.text_encoder_2, base.vae)
                 for p in m.parameters())  # fmt: skip
    print(f"SDXL architecture / {args.scale} widths, random weights: {params / 1e6:.0f} M "
          f"parameters; {device_name(device)}, {torch.get_num_threads()} threads, "
          f"{args.dtype}")  # fmt: skip
    print(f"text2video {args.frames} frames {args.size}x{args.size}, {args.steps} steps, "
          f"chunks of {args.chunk_size}, guidance {GUIDANCE}")  # fmt: skip
    if args.memory:
        rows = {}
        for frames in args.memory:
            spec = {"frames": frames, "threads": args.threads or 1, "args": vars(args)}
            spec["args"] = {**spec["args"], "memory": None, "child": None}
            cmd = [sys.executable, "-m", "bench.sdxl", "--child", json.dumps(spec)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[frames] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  ours {frames:4d} frames: peak {rows[frames]['process_peak_mib']:.0f} "
                  f"MiB, growth {rows[frames]['growth_mib']:.0f} MiB, "
                  f"{rows[frames]['seconds']:.1f} s")  # fmt: skip
        first, last = rows[args.memory[0]], rows[args.memory[-1]]
        print(f"peak RSS {args.memory[-1]} / {args.memory[0]} frames: "
              f"{last['process_peak_mib'] / first['process_peak_mib']:.3f}x")  # fmt: skip
        return 0
    variants = {"ours": ours(base, args, args.frames), "diffusers": diffusers_t2vz(base, args),
                "floor": floor(base, args)}  # fmt: skip
    warm_up(variants, device)
    results = interleaved(variants, args.repeats, device)
    for name, result in results.items():
        print(f"  {name:9s} median {result.median:.3f} s, fastest {min(result.seconds):.3f} s")
    # On a shared machine the fastest round is the least disturbed one: both are printed.
    for other in ("diffusers", "floor"):
        mine, theirs = results["ours"], results[other]
        print(f"ours / {other + ':':10s} {mine.median / theirs.median:.3f}x (medians), "
              f"{min(mine.seconds) / min(theirs.seconds):.3f}x (fastest rounds)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
