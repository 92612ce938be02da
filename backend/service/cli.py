"""Command line: ``python -m backend generate ...`` and ``python -m backend serve``.

``generate`` builds the same job object the Blender add-on sends (``protocol.validate_job``
checks both), runs it, and prints where the frames went.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from ..protocol import (
    CONSISTENCIES,
    DEFAULT_MODEL,
    DEFAULT_MOTION,
    DETECTOR_MODELS,
    DETECTORS,
    DEVICES,
    DTYPES,
    FITS,
    MAX_LINE_BYTES,
    MODES,
    PREDICTION_TYPES,
    PRESETS,
    UNION_CONTROL_TYPES,
    JobError,
    apply_preset,
    clip_text,
    parse_json,
    shown,
    validate_job,
)


def _frame_range(text: str) -> list[int]:
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected A:B (1-based, inclusive), got {text!r}"
        ) from None
    return [first, last]


def _controlnet(text: str) -> dict[str, Any]:
    """M[:WEIGHT]: a trailing number after the last colon is the weight."""
    model, sep, weight = text.rpartition(":")
    if sep:
        try:
            return {"model": model, "weight": float(weight)}
        except ValueError:
            pass
    return {"model": text, "weight": 1.0}


def _lora(text: str) -> dict[str, Any]:
    """PATH[:WEIGHT]: a LoRA file, folder, hub id or file of a hub repo with an optional
    weight (default 1)."""
    spec = _controlnet(text)
    return {"path": spec["model"], "weight": spec["weight"]}


def _embedding(text: str) -> dict[str, str]:
    """PATH:TOKEN: a textual inversion embedding and the word that calls it in prompts."""
    path, sep, token = text.rpartition(":")
    if not sep or not path or not token:
        raise argparse.ArgumentTypeError(f"expected PATH:TOKEN, got {text!r}")
    return {"path": path, "token": token}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m backend``."""
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description="Text2Video-Zero on diffusers: text-to-video, ControlNet video, "
        "Video Instruct-Pix2Pix.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="run one job and write its frames",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument(
        "--job",
        help="read the job from this JSON file (e.g. a result's job.json); "
        "other flags given on the command line override its fields",
    )
    gen.add_argument(
        "--mode",
        choices=MODES,
        help="text2video: prompt only; controlnet: "
        "follow control videos; pix2pix: edit --video by instruction "
        "[default: text2video]",
    )
    gen.add_argument(
        "--model",
        help="base model: hub id (owner/name, or owner/name/file.safetensors for one "
        "checkpoint file of a repo), diffusers folder, single-file "
        f".safetensors, or builtin:tiny (smoke test) [default: {DEFAULT_MODEL}; "
        "timbrooks/instruct-pix2pix for pix2pix]",
    )
    gen.add_argument(
        "--model-config",
        help="diffusers folder or hub id giving configs and "
        "tokenizer for a single-file checkpoint [default: its family's: "
        "stable-diffusion-v1-5, stable-diffusion-2-1 (2-1-base with --prediction-type "
        "epsilon) or stable-diffusion-xl-base-1.0]",
    )
    gen.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="what the UNet predicts, replacing its scheduler config's: epsilon (SD 1.x, "
        "SDXL, SD 2.x 512 px) or v_prediction (SD 2.x 768 px); for an SD 2.x single file "
        "it also picks the 512 px or 768 px configs [default: the model's own; a single "
        "file's safetensors metadata (modelspec.prediction_type) where it says, else its "
        "configs']",
    )
    gen.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="a named look that fills the fields you leave out: "
        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
        + ". Its prompt words are appended to --prompt and written to job.json",
    )
    gen.add_argument("--prompt", help="what to generate (pix2pix: the edit instruction)")
    gen.add_argument("--negative-prompt", help="what to avoid [default: empty]")
    gen.add_argument("--frames", type=int, help="number of frames [default: 8]")
    gen.add_argument(
        "--width",
        type=int,
        help="width in pixels, multiple of 8 [default: the model's native pixel count, "
        "512x512 on SD 1.x, at the input video's aspect ratio (square for text2video); "
        "with only --height, from that aspect]",
    )
    gen.add_argument(
        "--height", type=int, help="height in pixels, multiple of 8 [default: see --width]"
    )
    gen.add_argument(
        "--fit",
        choices=FITS,
        help="how input videos of another aspect ratio meet the size: crop (cover and "
        "centre-crop), pad (fit inside on black), stretch [default: crop]",
    )
    gen.add_argument("--steps", type=int, help="DDIM steps [default: 50]")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale [default: 7.5]")
    gen.add_argument(
        "--seed",
        type=int,
        help="random seed; the same job and seed give the same frames [default: 0]",
    )
    gen.add_argument(
        "--chunk-size",
        type=int,
        help="frames denoised together; memory grows with it, results do not change [default: 8]",
    )
    gen.add_argument(
        "--frame-range",
        type=_frame_range,
        metavar="A:B",
        help="compute only "
        "frames A..B (1-based, inclusive) of the full job, exactly as a full run "
        "would [default: all frames]",
    )
    gen.add_argument(
        "--motion",
        type=float,
        nargs=2,
        metavar=("DX", "DY"),
        help="camera pan "
        "per frame in 1/512 of the frame (x right, y down; the content drifts the "
        f"other way) [default: {DEFAULT_MOTION[0]:g} {DEFAULT_MOTION[1]:g} for "
        "text2video, none for controlnet]",
    )
    gen.add_argument(
        "--t0",
        type=int,
        help="motion dynamics: step count t0 < t1 [default: 44 of 50 steps, scaled]",
    )
    gen.add_argument(
        "--t1",
        type=int,
        help="motion dynamics: step count t1 < steps [default: 47 of 50 steps, scaled]",
    )
    gen.add_argument(
        "--smooth-bg",
        action="store_true",
        default=None,
        help="background "
        "smoothing (Sect. 3.3.3), masks from the prompt's cross-attention or "
        "--masks",
    )
    gen.add_argument(
        "--smooth-alpha", type=float, help="background smoothing strength [default: 0.6]"
    )
    gen.add_argument(
        "--masks", help="foreground masks (folder or movie, white = foreground) for --smooth-bg"
    )
    gen.add_argument(
        "--consistency",
        choices=CONSISTENCIES,
        help="controlnet and pix2pix: paper (cross-frame attention to frame 1) or flow (also "
        "each frame tied to the previous one along the input's motion; a --frame-range then "
        "computes the frames before it too) [default: paper]",
    )
    gen.add_argument(
        "--flow-source",
        metavar="estimate|FOLDER",
        help="where --consistency flow gets the motion: estimate (optical flow of the source "
        "or control video) or a folder of .npy motion-vector frames (H x W x 2: to the "
        "previous frame, or x 4: previous then next; pixels, y down) or of OpenEXR frames "
        "of Blender's Vector pass (multilayer or single-layer) [default: estimate]",
    )
    gen.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="M[:WEIGHT]",
        help="a ControlNet (hub id, one file of a hub repo, folder, .safetensors, "
        "builtin:tiny-controlnet) "
        "with optional weight; repeat for several, each paired with a --control",
    )
    gen.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="PATH",
        help="control video (image folder, movie, image, or OpenPose keypoints "
        ".json) for the ControlNet at the same position",
    )
    gen.add_argument(
        "--controlnet-config",
        action="append",
        default=[],
        metavar="DIR",
        help="diffusers ControlNet folder or hub id giving the config of a single-file "
        "ControlNet: one for all, or one per --controlnet [default: the SD 1.5 "
        "ControlNet config shipped with the backend]",
    )
    gen.add_argument(
        "--detector",
        action="append",
        default=[],
        choices=DETECTORS,
        help="turn the matching --control into control images in the backend [default: none]",
    )
    gen.add_argument(
        "--detector-model",
        action="append",
        default=[],
        metavar="ROLE=MODEL",
        help="weights a model detector loads for ROLE (openpose: person, pose; depth: depth), "
        "a hub id or folder, for every --detector that loads that role "
        "[default: the ids the README's Detectors section names]",
    )
    gen.add_argument(
        "--control-type",
        action="append",
        default=[],
        choices=list(UNION_CONTROL_TYPES),
        help="for a union ControlNet: which kind of control the matching --control is; none "
        "or one per --control [default: the --detector's kind]",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="a LoRA (.safetensors file, folder, hub id, or one file of a hub repo: "
        "owner/name/file.safetensors) with optional weight "
        "[default weight: 1]; repeat for several",
    )
    gen.add_argument(
        "--embedding",
        action="append",
        default=[],
        type=_embedding,
        metavar="PATH:TOKEN",
        help="a textual inversion embedding and the token that calls it in the prompt; "
        "repeat for several",
    )
    gen.add_argument("--video", help="pix2pix: the source video (image folder or movie)")
    gen.add_argument(
        "--image-guidance",
        type=float,
        help="pix2pix: how closely to follow the source video [default: 1.5]",
    )
    gen.add_argument("--fps", type=float, help="frame rate of the written mp4 [default: 8]")
    gen.add_argument("--no-mp4", action="store_true", help="write PNG frames only")
    gen.add_argument(
        "--device", choices=DEVICES, help="auto: CUDA, then MPS, then CPU [default: auto]"
    )
    gen.add_argument(
        "--dtype",
        choices=DTYPES,
        help="auto: float16 on CUDA; on the CPU bfloat16 with native bf16 (AMX, AVX-512 BF16), "
        "else float32 [default: auto]",
    )
    gen.add_argument(
        "--save-latents",
        action="store_true",
        default=None,
        help="also write the final latents as latents.npy (frames, 4, H/8, W/8) float32",
    )
    gen.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the UNet and ControlNets: the first job of a model and size takes "
        "longer (the compile, cached on disk), later jobs in the same worker run faster; "
        "falls back to uncompiled with a warning where compiling fails",
    )
    gen.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="allow pickled .ckpt/.bin weights (they can run code: only for sources you "
        "trust); only this flag enables them, never a job file's allow_pickle field",
    )
    gen.add_argument("--out", help="output folder; must not exist yet")
    add_cluster_arguments(gen)

    serve = sub.add_parser("serve", help="run the JSON-lines worker on stdin/stdout")
    serve.add_argument("--max-models", type=int, default=1, help="base models kept loaded")
    add_cluster_arguments(serve)
    return parser


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """--cluster, --cluster-token, --shard-size: where jobs run (not part of the job)."""
    parser.add_argument(
        "--cluster",
        metavar="HOST:PORT",
        help="run the frames on this Ray cluster (the head's address) instead of here "
        "[default: $T2VZ_CLUSTER; unset: run locally]",
    )
    parser.add_argument(
        "--cluster-token",
        metavar="TOKEN",
        help="the cluster's Ray auth token, required for an address other than this "
        "machine [default: $T2VZ_CLUSTER_TOKEN or $RAY_AUTH_TOKEN]",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        metavar="FRAMES",
        help="frames per shard on the cluster [default: the frames over the cluster's GPUs]",
    )


def read_job_file(path: str) -> dict[str, Any]:
    """The JSON object of a job file of at most MAX_LINE_BYTES; JobError saying what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LINE_BYTES + 1)  # never more: a huge file is refused unread
        if len(data) > MAX_LINE_BYTES:
            raise ValueError(f"it is larger than the limit of {MAX_LINE_BYTES} bytes")
        job = parse_json(data, "the file", excerpt=False)
    except (OSError, ValueError) as exc:
        raise JobError("job", f"cannot read job file {path}: {exc}") from None
    if not isinstance(job, dict):
        raise JobError("job", f"job file {path} must hold a JSON object")
    return job


def job_out_notice(job_file: str, out: str) -> str:
    """The line saying where a job file's own ``out`` puts the result (resolved)."""
    where = os.path.realpath(os.path.expanduser(out))
    return f"job file {job_file}: writing to {where} (the file's out; --out chooses another)"


def job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The job dict that ``args`` describe (not yet validated)."""
    job: dict[str, Any] = {}
    if args.job:
        job = read_job_file(args.job)
    simple = {
        "mode": args.mode,
        "model": args.model,
        "model_config": args.model_config,
        "prediction_type": args.prediction_type,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "frames": args.frames,
        "width": args.width,
        "height": args.height,
        "fit": args.fit,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "chunk_size": args.chunk_size,
        "frame_range": args.frame_range,
        "motion": args.motion,
        "t0": args.t0,
        "t1": args.t1,
        "smooth_bg": args.smooth_bg,
        "smooth_alpha": args.smooth_alpha,
        "masks": args.masks,
        "consistency": args.consistency,
        "flow_source": args.flow_source,
        "video": args.video,
        "image_guidance": args.image_guidance,
        "fps": args.fps,
        "device": args.device,
        "dtype": args.dtype,
        "save_latents": args.save_latents,
        "compile": args.compile,
        "allow_pickle": args.allow_pickle,
        "out": args.out,
    }
    job.update({k: v for k, v in simple.items() if v is not None})
    if args.no_mp4:
        job["write_mp4"] = False
    if args.steps is not None and args.t0 is None and args.t1 is None and args.job:
        job.pop("t0", None)  # a new step count rescales the job file's t0/t1
        job.pop("t1", None)
    if args.lora:
        job["loras"] = [_lora(spec) for spec in args.lora]
    if args.embedding:
        job["embeddings"] = list(args.embedding)
    if args.controlnet or args.control:
        if len(args.controlnet) != len(args.control):
            raise JobError(
                "controlnets",
                f"each --controlnet needs one --control, got {len(args.controlnet)} "
                f"ControlNets and {len(args.control)} controls",
            )
        if args.detector and len(args.detector) != len(args.control):
            raise JobError(
                "controlnets",
                f"give no --detector or one per --control, got {len(args.detector)} "
                f"for {len(args.control)} controls",
            )
        configs = args.controlnet_config
        if len(configs) == 1:
            configs = configs * len(args.controlnet)
        if configs and len(configs) != len(args.controlnet):
            raise JobError(
                "controlnets",
                f"give no --controlnet-config, one, or one per --controlnet, got "
                f"{len(configs)} for {len(args.controlnet)} ControlNets",
            )
        detectors = args.detector or ["none"] * len(args.control)
        job["controlnets"] = [
            {**_controlnet(spec), "control": control, "detector": detector}
            for spec, control, detector in zip(
                args.controlnet, args.control, detectors, strict=True
            )
        ]
        for spec, config in zip(job["controlnets"], configs, strict=False):
            spec["config"] = config
        if args.control_type and len(args.control_type) != len(args.control):
            raise JobError(
                "controlnets",
                f"give no --control-type or one per --control, got {len(args.control_type)} "
                f"for {len(args.control)} controls",
            )
        for spec, kind in zip(job["controlnets"], args.control_type, strict=False):
            spec["control_type"] = kind
        _apply_detector_models(job["controlnets"], args.detector_model)
    elif args.controlnet_config or args.detector or args.control_type or args.detector_model:
        given = next(
            flag
            for flag, value in (
                ("--controlnet-config", args.controlnet_config),
                ("--detector", args.detector),
                ("--control-type", args.control_type),
                ("--detector-model", args.detector_model),
            )
            if value
        )
        raise JobError(
            "controlnets",
            f"{given} applies to the --controlnet/--control pairs of the command line, "
            "and none was given",
        )
    if args.preset:
        job = apply_preset(job, args.preset)
    return job


def _apply_detector_models(controlnets: list[dict], pairs: list[str]) -> None:
    """``--detector-model ROLE=MODEL``: the weights for ROLE of every ControlNet whose detector
    loads that role, stored as its ``detector_models``."""
    for pair in pairs:
        role, sep, model = pair.partition("=")
        role, model = role.strip(), model.strip()
        if not sep or not role or not model:
            raise JobError(
                "detector_models", f"--detector-model wants ROLE=MODEL, got {shown(pair)}"
            )
        users = [c for c in controlnets if role in DETECTOR_MODELS.get(c["detector"], {})]
        if not users:
            roles = sorted({r for models in DETECTOR_MODELS.values() for r in models})
            chosen = sorted({c["detector"] for c in controlnets})
            raise JobError(
                "detector_models",
                f"--detector-model {shown(pair)}: no --detector of this job "
                f"({', '.join(chosen)}) loads the role {role!r}; roles: {', '.join(roles)}",
            )
        for spec in users:
            spec.setdefault("detector_models", {})[role] = model


def cluster_config(args: argparse.Namespace) -> Any:
    """The ClusterConfig the arguments (or $T2VZ_CLUSTER) give; None: run locally."""
    if not (args.cluster or os.environ.get("T2VZ_CLUSTER")):
        if args.shard_size is not None:
            raise ValueError("--shard-size needs a cluster (--cluster or $T2VZ_CLUSTER)")
        return None
    from .cluster import config_from_env

    return config_from_env(args.cluster, args.cluster_token, args.shard_size)


def _generate(args: argparse.Namespace) -> int:
    try:
        job = validate_job(job_from_args(args))
    except JobError as exc:
        print(f"error: bad job: {clip_text(str(exc))}", file=sys.stderr)
        return 2
    if args.job and args.out is None:
        # The job file chose the output folder: say where, before anything is written (a
        # job file from someone else may aim anywhere; --out chooses instead).
        print(f"{job_out_notice(args.job, job.out)}", file=sys.stderr)
    from .runner import JobEvents, run_job  # torch and diffusers: only for a valid job

    def progress(step: int, total: int, written: int, frames: int, fraction: float, stage: str):
        print(
            f"\r{stage}: step {step}/{total}, frames {written}/{frames} ({fraction:5.1%})",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def download(state: Any) -> None:
        finished = not state.file and state.bytes_done == state.bytes_total
        end = "\n" if finished else ""  # the step progress line starts on a line of its own
        print(f"\r{state.describe()}\033[K", end=end, file=sys.stderr, flush=True)

    try:
        events = JobEvents(progress=progress, download=download)
        cluster = cluster_config(args)
        if cluster is None:
            result = run_job(job, events=events, allow_pickle=args.allow_pickle is True)
        else:
            from .cluster import run_on_cluster

            result = run_on_cluster(job, cluster, events, allow_pickle=args.allow_pickle is True)
    except Exception as exc:  # one clear line for the user; -v shows the traceback
        print(file=sys.stderr)
        logging.getLogger(__name__).debug("job failed", exc_info=True)
        print(f"error: {type(exc).__name__}: {clip_text(str(exc))}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    print(f"wrote {len(result.frames)} frames to {result.out} in {result.seconds:.1f} s")
    return 0


def _exit_on_signal(signum: int, frame: Any) -> None:
    """Unwind like an error (exit status 128 + signal), so partial output is removed."""
    sys.exit(128 + signum)


INTERRUPTED = 128 + signal.SIGINT
"""What ``main`` returns after Ctrl-C (a shell's ``$?`` for a program killed by SIGINT)."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; Ctrl-C returns ``INTERRUPTED`` with one line, no traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # the job's staging folder is gone already (staged_output)
        print("\ninterrupted: no result written", file=sys.stderr)
        return INTERRUPTED


def exit_as_program(status: int) -> None:
    """Leave the process with ``status``; after Ctrl-C, die by SIGINT once cleaned up.

    A program that caught Ctrl-C should end killed by SIGINT, so that the shell or script
    that ran it stops too (a ``for`` loop over shots, ``make``) and ``$?`` reads 130.
    CPython does the same for an uncaught KeyboardInterrupt. An exit status of 130 instead
    would let the loop carry on, and CPython's own re-kill made the status depend on
    where the interrupt landed (CI saw both).
    """
    if status == INTERRUPTED and os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # fatal on delivery, before kill returns
    sys.exit(status)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a render farm or the add-on stopping us) and SIGHUP (the terminal closed)
    # unwind like an error, so a running job removes its partial output.
    for name in ("SIGTERM", "SIGHUP"):  # no SIGHUP on Windows
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _exit_on_signal)
    # Our own INFO lines (the size chosen, adapters applied); the libraries' only with -v
    # (torch logs cache statistics at exit, for one).
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("backend").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command == "serve":
        from .worker import serve

        try:
            cluster = cluster_config(args)
        except (ValueError, RuntimeError) as exc:  # a bad --shard-size or $T2VZ_CLUSTER_*
            print(f"error: {type(exc).__name__}: {clip_text(str(exc))}", file=sys.stderr)
            return 2
        return serve(max_models=args.max_models, cluster=cluster)
    return _generate(args)
