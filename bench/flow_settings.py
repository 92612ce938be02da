"""Choosing flow fusion settings on held-out seeds (never the judged seeds 0..31).

Runs bench.quality's flow section for each candidate ``FlowFusion`` on seeds disjoint from
the judged run's, with estimated flow, and prints each candidate's warp error as a multiple
of the paper's and its quality figures' paired difference from the paper, side by side in
one run on the same loaded models (QUALITY.md, "Flow-guided consistency"):

    .venv/bin/python -m bench.flow_settings                      # seeds 1000..1015
    .venv/bin/python -m bench.flow_settings --first-seed 2000 --seeds 8 --modes pix2pix
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from backend.engine.flow import FlowFusion

from . import quality

# The candidates of the held-out choice (issue 21's last round): the earlier default
# (latent 0.5 + final pixel 0.5), the lighter latent fusion under a stronger pixel one, and
# Rerender-A-Video's pixel-aware latent fusion in the loop, relative ("aware-rel": the
# previous fused x0 decoded, warped at full resolution and re-encoded, less x0's own VAE
# round trip; a latent cell fused where >= 50 % of its pixels are visible), at 0.5 and at
# 0.25 (the default). The other candidates tried and their figures: QUALITY.md, flow.
CANDIDATES = {
    "latent 0.5 + pixel 0.5": FlowFusion(strength=0.5, pixel_aware=0.0, pixel_strength=0.5),
    "latent 0.25 + pixel 0.6": FlowFusion(strength=0.25, pixel_aware=0.0, pixel_strength=0.6),
    "latent 0.5 + aware-rel 0.5 + pixel 0.5": FlowFusion(
        strength=0.5, pixel_aware=0.5, pixel_aware_relative=True, pixel_strength=0.5
    ),
    "latent 0.25 + aware-rel 0.25 + pixel 0.6": FlowFusion(
        strength=0.25, pixel_aware=0.25, pixel_aware_relative=True, pixel_strength=0.6
    ),
}
JUDGED_SEEDS = range(0, 32)


def ratio(rows: Sequence[dict], paper: Sequence[dict], key: str) -> float:
    """Mean of ``key`` over ``rows`` as a multiple of the paper's mean."""
    return float(np.mean([r[key] for r in rows]) / np.mean([r[key] for r in paper]))


def paired(rows: Sequence[dict], paper: Sequence[dict], key: str) -> float:
    """Mean paired difference of ``key`` from the paper's (NaNs left out)."""
    return float(np.nanmean([r[key] - p[key] for r, p in zip(rows, paper, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flow_settings", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=list(quality.FLOW_MODES))
    args = parser.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if set(seeds) & set(JUDGED_SEEDS):
        parser.error(f"seeds {seeds.start}..{seeds.stop - 1} overlap the judged seeds 0..31")
    torch.set_num_threads(1)
    settings = quality.Settings(seeds=args.seeds, first_seed=args.first_seed)
    print(f"held-out seeds {seeds.start}..{seeds.stop - 1}, estimated flow")
    for mode in args.modes:
        models = quality.load_models(
            quality.SHAPES_MODELS, ["flow"], torch.float32, torch.device("cpu"), (mode,)
        )
        engine = models.controlnet if mode == "controlnet" else models.pix2pix
        with torch.inference_mode():
            paper, _ = quality.flow_mode(mode, engine, settings, ("paper",))
            for name, fusion in CANDIDATES.items():
                rows, _ = quality.flow_mode(
                    mode, engine, settings, ("flow, estimated",), fusion=fusion
                )
                est = rows["flow, estimated"]
                figures = " ".join(
                    f"{key} {paired(est, paper['paper'], key):+.3f}"
                    for key in quality.FLOW_QUALITY[mode]
                )
                print(
                    f"{mode:10s} {name:26s} warp dE x{ratio(est, paper['paper'], 'warp_de'):.2f}"
                    f" MSE x{ratio(est, paper['paper'], 'warp_mse'):.2f}  {figures}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
