"""channels_last and torch.compile against the default UNet, side by side in ONE process.

SD 1.5's UNet architecture with random weights (bench/configs/sd15), one guided chunk
(2 branches x ``--frames`` frames) at ``--size`` pixels, with our cross-frame attention
processors installed as the engine runs them. Variants: the
default (contiguous tensors), channels_last weights and inputs, torch.compile of the
UNet, and both. Each is warmed up (compile time reported apart), then timed in
``--repeats`` rounds with the order rotating; medians and ratios to the default.

    python -m bench.formats --size 64 --frames 4 --repeats 5
    python -m bench.formats --device cuda --dtype float16 --size 512 --frames 8 --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

VARIANTS = ("default", "channels_last", "compile", "compile+channels_last")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.formats", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels")
    parser.add_argument("--frames", type=int, default=4, help="frames in the chunk")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    return parser.parse_args(argv)


def build_unet() -> torch.nn.Module:
    """SD 1.5's UNet with random weights, eval mode, fp32."""
    from diffusers import UNet2DConditionModel

    from .models import _config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_config("unet"))
    return unet.requires_grad_(False).eval()


def variants(unet: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    """Each variant's model; compiled ones wrap the eager module of the same memory format
    (one channels_last copy at most: an SD 1.5 UNet is 3.4 GB)."""
    last = None
    if any("channels_last" in name for name in names):
        last = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    out = {}
    for name in names:
        model = last if "channels_last" in name else unet
        out[name] = torch.compile(model) if "compile" in name else model
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from backend.engine.attention import AnchorState, installed_processors
    from backend.models.loading import TORCH_DTYPES, resolve_device

    from .measure import synchronize
    from .run import machine

    device, dtype = resolve_device(args.device), TORCH_DTYPES[args.dtype]
    print("command: python -m bench.formats " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {machine(device, dtype)}")
    unet = build_unet().to(device, dtype)
    lat = args.size // 8
    gen = torch.Generator().manual_seed(0)
    batch = 2 * args.frames  # (uncond, cond) x frames
    x = torch.randn(batch, 4, lat, lat, generator=gen).to(device, dtype)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    text = text.to(device, dtype)
    t = torch.tensor(500, device=device)

    models = variants(unet, args.variants)
    inputs = {
        name: x.to(memory_format=torch.channels_last) if "channels_last" in name else x
        for name in args.variants
    }
    outputs: dict[str, torch.Tensor] = {}
    state = AnchorState()
    state.branches = 2

    def call(name: str) -> torch.Tensor:
        state.capture = True  # the chunk holding frame 1, as in the first chunk of a step
        out = models[name](inputs[name], t, encoder_hidden_states=text, return_dict=False)[0]
        state.clear()
        return out

    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    # Processors stay installed for the whole run (a compiled UNet recompiles when its
    # processor objects change).
    eager = {id(_inner(m)): _inner(m) for m in models.values()}  # each module once
    installed = [(f"unet{i}", model) for i, model in enumerate(eager.values())]
    with torch.inference_mode(), installed_processors(installed, state, None, lat * lat):
        for name in args.variants:
            started = time.perf_counter()
            outputs[name] = call(name)
            call(name)  # a second warm-up: compiled code may specialise on the first
            synchronize(device)
            print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s", flush=True)
        for r in range(args.repeats):
            shift = r % len(args.variants)
            for name in args.variants[shift:] + args.variants[:shift]:
                started = time.perf_counter()
                call(name)
                synchronize(device)
                seconds[name].append(time.perf_counter() - started)
    base = statistics.median(seconds[args.variants[0]])
    print(f"\nUNet, 2 x {args.frames} frames, {args.size}x{args.size}, {args.repeats} rounds")
    print(f"  {'variant':<24} {'median s':>9} {'min s':>8} {'/ default':>10} {'max abs diff':>13}")
    for name in args.variants:
        diff = (outputs[name].float() - outputs[args.variants[0]].float()).abs().max().item()
        med = statistics.median(seconds[name])
        print(f"  {name:<24} {med:9.3f} {min(seconds[name]):8.3f} {med / base:10.3f} {diff:13.2e}")
    return 0


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The UNet under a torch.compile wrapper (processors are installed on it)."""
    return getattr(model, "_orig_mod", model)


if __name__ == "__main__":
    raise SystemExit(main())
