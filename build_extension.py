"""Build the installable Blender extension zip.

    python build_extension.py [--output-dir dist] [--blender /path/to/blender]

The zip holds ``blender_manifest.toml`` and the add-on's modules (``blender_t2vz/*``) at
its root, with ``backend/`` and ``install_deps.py`` inside, and is built and validated by
Blender's own extension tool: ``blender --command extension build`` when ``--blender`` is
given, else ``bl_pkg/cli/blender_ext.py`` from the ``bpy`` module of this Python. Install
the result from Blender: Edit > Preferences > Get Extensions > Install from Disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON = ROOT / "blender_t2vz"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "tests", ".*")


class BuildError(RuntimeError):
    """The extension cannot be built; the message says what is missing."""


def manifest() -> dict[str, str]:
    """``id`` and ``version`` of ``blender_manifest.toml`` (Blender's tool checks the rest)."""
    text = (ROOT / "blender_manifest.toml").read_text(encoding="utf-8")
    data = {}
    for key in ("id", "version"):
        match = re.search(rf'^{key}\s*=\s*"([^"]+)"', text, re.MULTILINE)
        if match is None:
            raise BuildError(f"blender_manifest.toml has no {key}")
        data[key] = match.group(1)
    return data


def stage(target: Path) -> Path:
    """Lay out the extension's files in ``target`` (created) and return it."""
    for required in (ROOT / "blender_manifest.toml", ADDON / "__init__.py", ROOT / "backend"):
        if not required.exists():
            raise BuildError(f"missing {required}")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "blender_manifest.toml", target / "blender_manifest.toml")
    for item in ADDON.iterdir():
        if item.name in ("__pycache__",) or item.name.startswith(".") or item.suffix == ".pyc":
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name, ignore=SKIP)
        else:
            shutil.copy2(item, target / item.name)
    shutil.copytree(ROOT / "backend", target / "backend", ignore=SKIP)
    install = ROOT / "install_deps.py"
    if install.is_file():
        shutil.copy2(install, target / "install_deps.py")
    else:
        print(f"warning: {install} not found; the zip has no installer", file=sys.stderr)
    return target


def bpy_tools() -> tuple[Path, Path] | None:
    """``blender_ext.py`` and Blender's tag list from the installed ``bpy`` module, if any."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for scripts in sorted(Path(location).glob("*/scripts")):
            tool = scripts / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
            tags = scripts / "modules" / "_bpy_internal" / "extensions" / "tags.py"
            if tool.is_file():
                return tool, tags
    return None


def extension_command(blender: str | None) -> list[str]:
    """The command prefix that runs Blender's extension tool."""
    if blender:
        return [blender, "--factory-startup", "--command", "extension"]
    tools = bpy_tools()
    if tools is None:
        raise BuildError("no Blender extension tool: pass --blender or install the bpy module")
    return [sys.executable, str(tools[0])]


def _tags_args(blender: str | None) -> list[str]:
    if blender:
        return []  # Blender passes its own tag list
    tools = bpy_tools()
    return [f"--valid-tags={tools[1]}"] if tools and tools[1].is_file() else []


def validate(path: Path, blender: str | None = None) -> None:
    """Validate an extension folder or zip with Blender's tool; raise BuildError if invalid."""
    cmd = [*extension_command(blender), "validate", *_tags_args(blender), str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"validation failed:\n{result.stdout}{result.stderr}")


def build(output_dir: Path, blender: str | None = None) -> Path:
    """Build the extension zip into ``output_dir`` and return its path."""
    data = manifest()
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    zip_path = output_dir / f"{data['id']}-{data['version']}.zip"
    if zip_path.exists():
        zip_path.unlink()  # a build output of ours, rebuilt
    with tempfile.TemporaryDirectory(prefix="t2vz_ext_") as tmp:
        source = stage(Path(tmp) / data["id"])
        cmd = [
            *extension_command(blender),
            "build",
            f"--source-dir={source}",
            f"--output-filepath={zip_path}",
            *_tags_args(blender),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not zip_path.is_file():
            raise BuildError(f"build failed:\n{result.stdout}{result.stderr}")
    validate(zip_path, blender)
    return zip_path


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "dist")
    parser.add_argument("--blender", help="a Blender 4.2+ binary (default: the bpy module's tool)")
    args = parser.parse_args(argv)
    try:
        path = build(args.output_dir, args.blender)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
