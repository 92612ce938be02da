#!/usr/bin/env python3
"""Create the backend's Python environment and install what it needs.

    python3 install_deps.py                    # .venv beside this file, torch for this machine
    python3 install_deps.py --demo             # ... then generate a demo video (offline)
    python3 install_deps.py --dev --run-tests  # ... with test tools, then run the test suite
    python3 install_deps.py --detectors        # ... with the HED/lineart/MLSD detectors (controlnet-aux)
    python3 install_deps.py --cluster          # ... with Ray, to run jobs on a cluster (--cluster)

The backend runs in its own virtual environment (torch, diffusers, transformers, ...),
never inside Blender. PyTorch is chosen for the machine: a CUDA build on Linux/Windows
with an NVIDIA GPU, the CPU build otherwise (``--torch`` overrides), and an installed
torch that already satisfies the requirement is kept. Progress lines start with
``[t2vz]`` so the Blender add-on can show them. Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH_VERSION = "2.13.0"
TORCH_MINIMUM = (2, 1)
# PyTorch's own wheel indexes: the CPU build (no CUDA libraries) and a CUDA 12.8 build.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
BACKEND_REQUIREMENTS = HERE / "backend" / "requirements.txt"
# The exact versions the test suite ran with (regenerate: --write-constraints): a user's
# install gets what was tested. torch is left out: its build is chosen per machine.
BACKEND_CONSTRAINTS = HERE / "backend" / "constraints.txt"
# torch (and its CUDA parts) is chosen per machine by ensure_torch; pip and setuptools
# belong to the environment itself: never pinned.
UNPINNED_PREFIXES = ("torch", "nvidia-", "triton", "pip", "setuptools", "wheel")
DEV_REQUIREMENTS = HERE / "requirements-dev.txt"
# Ray for `generate --cluster` (backend/service/cluster.py): an optional extra, also part of
# --dev so the test suite runs the cluster tests. 2.52 brought token authentication.
CLUSTER_REQUIREMENT = "ray>=2.52,<3"
# Blender's platform tags where this installer can set up the backend (PyTorch 2.13 has
# wheels there); blender_manifest.toml lists the same in ``platforms``.
SUPPORTED_PLATFORMS = ("windows-x64", "linux-x64", "macos-arm64")
# bpy wheels on PyPI exist for one Python version per Blender release (3.11 for 4.2-5.0).
BPY_PYTHON = (3, 11)
# Shared libraries the bpy module loads (Debian package names in DESIGN.md).
BPY_LIBRARIES = ("X11", "Xrender", "Xfixes", "Xi", "xkbcommon", "Xext", "SM", "GL", "EGL")


def say(message: str) -> None:
    """One progress line for people and for the add-on's progress display."""
    print(f"[t2vz] {message}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    """Run a command, echoing it; stop with its exit code when it fails."""
    say("$ " + " ".join(str(c) for c in cmd))
    result = subprocess.run(cmd, **kwargs)
    if result.returncode:
        say(f"command failed with exit code {result.returncode}")
        sys.exit(result.returncode)


def platform_tag() -> str:
    """This machine as a Blender extension platform tag, e.g. "linux-x64", "macos-arm64"."""
    system = {"Windows": "windows", "Linux": "linux", "Darwin": "macos"}.get(
        platform.system(), platform.system().lower()
    )
    machine = platform.machine().lower()
    arch = {"amd64": "x64", "x86_64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    return f"{system}-{arch or machine}"


def venv_python(venv: Path) -> Path:
    """The python executable inside a virtual environment."""
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def ensure_venv(venv: Path) -> Path:
    """Create the virtual environment unless it exists; return its python."""
    python = venv_python(venv)
    if python.exists():
        say(f"using the environment at {venv}")
        return python
    say(f"creating the environment at {venv}")
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(python), "-m", "pip", "install", "--upgrade", "pip"], stdout=sys.stdout)
    return python


def installed_torch(python: Path) -> tuple[tuple[int, int], bool] | None:
    """(major, minor) and CUDA support of the environment's torch, or None."""
    probe = (
        "import torch, sys; v = torch.__version__.split('+')[0].split('.'); "
        "print(v[0], v[1], int(torch.version.cuda is not None))"
    )
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if result.returncode:
        return None
    major, minor, cuda = result.stdout.split()
    return (int(major), int(minor)), cuda == "1"


def has_nvidia_gpu() -> bool:
    """True when an NVIDIA driver answers (nvidia-smi lists a GPU)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    result = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return result.returncode == 0 and "GPU" in result.stdout


def choose_torch(flavour: str) -> str:
    """ "cuda" or "cpu" for --torch auto: CUDA on Linux/Windows with an NVIDIA GPU."""
    if flavour != "auto":
        return flavour
    if platform.system() in ("Linux", "Windows") and has_nvidia_gpu():
        return "cuda"
    return "cpu"


def reachable(url: str, timeout: float = 3.0) -> bool:
    """True when the host of ``url`` accepts a connection (checked once, quickly)."""
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def torch_install_command(python: Path, flavour: str, version: str) -> list[str]:
    """The pip command that installs the chosen PyTorch build."""
    cmd = [str(python), "-m", "pip", "install", f"torch=={version}"]
    system = platform.system()
    index = None
    if flavour == "cpu" and system in ("Linux", "Windows"):
        index = TORCH_CPU_INDEX  # PyPI's Linux wheel carries GBs of CUDA libraries
    elif flavour == "cuda" and system == "Windows":
        index = TORCH_CUDA_INDEX  # PyPI's Windows wheel is CPU-only
    if index and reachable(index):
        # PyTorch's index for torch itself; its dependencies come from the usual index.
        cmd += ["--index-url", index, "--no-deps"]
    elif index:
        say(f"{index} is out of reach: installing torch from the configured package index")
    return cmd


def ensure_torch(python: Path, flavour: str, version: str) -> None:
    """Install PyTorch unless the environment's torch already satisfies the requirement."""
    wanted = choose_torch(flavour)
    found = installed_torch(python)
    if found is not None:
        (major, minor), cuda = found
        if (major, minor) >= TORCH_MINIMUM and (cuda or wanted == "cpu"):
            say(f"keeping the installed torch {major}.{minor} ({'CUDA' if cuda else 'CPU'})")
            return
    say(f"installing torch {version} ({wanted} build)")
    cmd = torch_install_command(python, wanted, version)
    run(cmd)
    if "--no-deps" in cmd:
        # torch's own dependencies from the usual index; the installed build satisfies the pin.
        run([str(python), "-m", "pip", "install", f"torch=={version}"])


def missing_bpy_libraries() -> list[str]:
    """Shared libraries bpy needs that the system lacks (Linux only)."""
    if platform.system() != "Linux":
        return []
    return [lib for lib in BPY_LIBRARIES if ctypes.util.find_library(lib) is None]


def install_packages(python: Path, dev: bool, pinned: bool = True, cluster: bool = False) -> None:
    """The backend's packages (the test tools with ``dev``, Ray with ``cluster`` or ``dev``),
    keeping the chosen torch.

    ``pinned``: hold every package to the tested version in backend/constraints.txt.
    """
    constraints = python.parent / "t2vz-constraints.txt"
    torch_version = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Never let a dependency swap the chosen torch build for another one.
    constraints.write_text(f"torch=={torch_version}\n", encoding="utf-8")
    cmd = [str(python), "-m", "pip", "install", "-c", str(constraints)]
    cmd += ["-r", str(BACKEND_REQUIREMENTS)]
    if cluster or dev:
        cmd += [CLUSTER_REQUIREMENT]
    if dev:
        cmd += ["-r", str(DEV_REQUIREMENTS)]
        if sys.version_info[:2] == BPY_PYTHON:
            cmd += ["bpy>=4.2,<5.1"]
        else:
            say(
                f"bpy (Blender as a module) needs Python {BPY_PYTHON[0]}.{BPY_PYTHON[1]}; "
                f"this is {platform.python_version()}: the add-on tests will be skipped"
            )
    if pinned and BACKEND_CONSTRAINTS.is_file():
        cmd += ["-c", str(BACKEND_CONSTRAINTS)]
        say(f"using the tested versions in {BACKEND_CONSTRAINTS.name} (--unpinned: newest allowed)")
        if sys.version_info[:2] != BPY_PYTHON:
            say(
                f"the versions were tested on Python {BPY_PYTHON[0]}.{BPY_PYTHON[1]}; if one has "
                "no wheel for this Python, run again with --unpinned"
            )
    say("installing the backend packages" + (" and test tools" if dev else ""))
    run(cmd)
    if dev:
        missing = missing_bpy_libraries()
        if missing:
            say(
                "bpy needs system libraries that are missing: "
                + ", ".join(missing)
                + ". On Debian/Ubuntu: sudo apt-get install libx11-6 libxrender1 libxfixes3 "
                "libxi6 libxkbcommon0 libxext6 libsm6 libgl1 libegl1 libegl-mesa0 "
                "libgl1-mesa-dri"
            )


def torchvision_version(torch_version: str) -> str:
    """The torchvision release built for a torch release: torch 2.m.p pairs with 0.(m+15).p."""
    match = re.match(r"2\.(\d+)\.(\d+)", torch_version)
    if not match:
        raise ValueError(f"no known torchvision release for torch {torch_version}")
    return f"0.{int(match.group(1)) + 15}.{match.group(2)}"


def torch_build_index(torch_version: str) -> str | None:
    """PyTorch's wheel index of the installed torch build ("+cpu", "+cu128"); None: PyPI's."""
    _, _, build = torch_version.partition("+")
    if not re.fullmatch(r"cpu|cu\d+|rocm[\d.]+", build):
        return None
    return f"{TORCH_CPU_INDEX.rsplit('/', 1)[0]}/{build}"


def detectors_install_commands(
    python: Path, torch_version: str, constraints: list[Path]
) -> list[list[str]]:
    """pip commands for the controlnet-aux detectors: a torchvision built for the installed
    torch (from the index that torch came from), then controlnet-aux, torch held in place."""
    pins = [arg for path in constraints for arg in ("-c", str(path))]
    vision = [
        str(python),
        "-m",
        "pip",
        "install",
        f"torchvision=={torchvision_version(torch_version)}",
    ]
    index = torch_build_index(torch_version)
    if index and reachable(index):
        vision += ["--index-url", index, "--no-deps"]  # its other dependencies are installed
    elif index:
        say(f"{index} is out of reach: looking for torchvision on the configured package index")
    return [vision + pins, [str(python), "-m", "pip", "install", "controlnet-aux", *pins]]


def install_detectors(python: Path, pinned: bool = True) -> None:
    """controlnet-aux and a matching torchvision, for the hed, lineart and mlsd detectors
    (openpose and depth need only the requirements)."""
    torch_version = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    constraints = [python.parent / "t2vz-constraints.txt"]  # torch==the installed build
    if pinned and BACKEND_CONSTRAINTS.is_file():
        constraints.append(BACKEND_CONSTRAINTS)
    say(
        f"installing the controlnet-aux detectors (controlnet-aux, torchvision for torch "
        f"{torch_version})"
    )
    for cmd in detectors_install_commands(python, torch_version, constraints):
        run(cmd)


def normalized_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions(python: Path) -> dict[str, str]:
    """{normalized name: version} of every distribution in ``python``'s environment."""
    probe = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True)
    found = json.loads(result.stdout)
    return {normalized_name(name): version for name, version in found.items() if name}


def constraints_text(versions: dict[str, str]) -> str:
    """A pip constraints file pinning ``versions`` exactly, torch and its CUDA parts left out."""
    lines = [
        "# The exact versions the test suite ran with; install_deps.py installs with them.",
        "# Regenerate from a tested environment: python3 install_deps.py --write-constraints",
        "# torch is not pinned here: install_deps.py picks its build for the machine.",
    ]
    for name in sorted(versions):
        if name.startswith(UNPINNED_PREFIXES):
            continue
        version = versions[name].split("+")[0]  # a local build tag is not on the index
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def read_constraints(path: Path = BACKEND_CONSTRAINTS) -> dict[str, str]:
    """{normalized name: version} pinned by a constraints file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalized_name(name.strip())] = version.strip()
    return pins


# The offline demo: the built-in shapes model draws what the prompt names, and the camera
# pan (24/512 of the frame per frame, 3 px at 64x64) carries the circle and its textured
# background. The warp comes after half the steps (t0 8, t1 10 of 20), not the paper's
# default (18, 19 here): this small model places its shape late, and an earlier warp acts
# on noise, so every frame drew the circle somewhere new (QUALITY.md, text-to-video 2).
# The README's strip (docs/demo-shapes.png) is this command; tests/test_quality.py checks it.
SHAPES_DEMO = [
    *("--model", "builtin:shapes", "--prompt", "a red circle on a blue background"),
    *("--width", "64", "--height", "64", "--steps", "20", "--motion", "24", "24"),
    *("--t0", "8", "--t1", "10", "--seed", "1"),
]


def run_demo(python: Path, which: str) -> None:
    """Generate a short demo video: the offline shapes model, the tiny one or the real SD 1.5."""
    out = HERE / "t2vz_out" / f"demo-{which}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [str(python), "-m", "backend", "generate"]
    if which == "shapes":
        say("demo with builtin:shapes, trained here on coloured shapes: a red circle, panning")
        cmd += SHAPES_DEMO
    elif which == "tiny":
        say("demo with builtin:tiny, a random-weight smoke-test model: expect coloured noise")
        cmd += ["--prompt", "a horse galloping on a street", "--model", "builtin:tiny"]
        cmd += ["--width", "128", "--height", "128", "--steps", "10"]
    else:
        cmd += ["--prompt", "a horse galloping on a street"]
        say("demo with Stable Diffusion 1.5 (downloads ~4 GB once; a GPU is much faster)")
    cmd += ["--frames", "8", "--out", str(out)]
    run(cmd, cwd=HERE)
    say(f"demo frames and video.mp4 are in {out}")


def run_tests(python: Path) -> int:
    """The backend suite, then the add-on suite in its own process (bpy loads once)."""
    env = dict(os.environ, PYTHONPATH=str(HERE))
    say("running the backend tests")
    backend = subprocess.run(
        [str(python), "-m", "pytest", "tests", "--ignore=tests/addon"], cwd=HERE, env=env
    )
    has_bpy = subprocess.run([str(python), "-c", "import bpy"], capture_output=True).returncode
    if has_bpy != 0:
        say("bpy is not importable here: skipping the add-on tests")
        return backend.returncode
    say("running the add-on tests (headless Blender)")
    addon = subprocess.run([str(python), "-m", "pytest", "tests/addon"], cwd=HERE, env=env)
    return backend.returncode or addon.returncode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv",
        type=Path,
        default=HERE / ".venv",
        help="where to create the environment (default: .venv beside this file)",
    )
    parser.add_argument(
        "--torch",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="PyTorch build; auto: CUDA with an NVIDIA GPU on Linux/Windows",
    )
    parser.add_argument(
        "--torch-version",
        default=TORCH_VERSION,
        help="PyTorch version to install when none fits (default: %(default)s)",
    )
    parser.add_argument(
        "--dev", action="store_true", help="also install the test tools (pytest, ruff, bpy)"
    )
    parser.add_argument(
        "--demo",
        nargs="?",
        const="shapes",
        choices=("shapes", "tiny", "sd15"),
        help="then generate a demo video: shapes (offline, default), tiny (offline noise, a "
        "smoke test) or sd15",
    )
    parser.add_argument(
        "--run-tests", action="store_true", help="then run the whole test suite (implies --dev)"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also install Ray, to run jobs on a Ray cluster (generate --cluster; "
        "included with --dev)",
    )
    parser.add_argument(
        "--detectors",
        action="store_true",
        help="also install the HED, lineart and MLSD detectors (controlnet-aux with a "
        "torchvision that matches the installed torch; OpenPose and Depth need neither)",
    )
    parser.add_argument(
        "--unpinned",
        action="store_true",
        help="newest versions the requirements allow instead of the tested ones "
        "(backend/constraints.txt), e.g. for a Python version the pins have no wheels for",
    )
    parser.add_argument(
        "--write-constraints",
        action="store_true",
        help="write backend/constraints.txt from the environment (after its tests passed) and stop",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Set up the environment, then optionally run the demo and the tests."""
    args = parse_args(argv)
    if sys.version_info < (3, 10):  # noqa: UP036 (the check is for whoever runs it)
        say(f"Python 3.10 or newer is needed, this is {platform.python_version()}")
        return 1
    dev = args.dev or args.run_tests
    if platform_tag() not in SUPPORTED_PLATFORMS:
        say(
            f"{platform_tag()} is not among the supported platforms "
            f"({', '.join(SUPPORTED_PLATFORMS)}): PyTorch may have no build for it"
        )
    venv = args.venv.expanduser().resolve()
    if args.write_constraints:
        BACKEND_CONSTRAINTS.write_text(constraints_text(installed_versions(venv_python(venv))))
        say(f"wrote {BACKEND_CONSTRAINTS} from {venv}")
        return 0
    python = ensure_venv(venv)
    ensure_torch(python, args.torch, args.torch_version)
    install_packages(python, dev, pinned=not args.unpinned, cluster=args.cluster)
    if args.detectors:
        install_detectors(python, pinned=not args.unpinned)
    say(f"backend environment ready: {python}")
    if args.demo:
        run_demo(python, args.demo)
    if args.run_tests:
        return run_tests(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
