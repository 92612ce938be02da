"""Registration, the manifest and the built extension, and what the add-on never imports."""

import ast
import subprocess
import sys
from pathlib import Path

import addon_utils
import bpy
import pytest
from conftest import ADDON, ROOT, configure_prefs, enable_addon

FORBIDDEN = {"torch", "diffusers", "transformers", "cv2", "controlnet_aux", "backend"}


def _registered() -> dict[str, bool]:
    return {
        "operator": hasattr(bpy.types, "T2VZ_OT_generate"),
        "panel": hasattr(bpy.types, "T2VZ_PT_main"),
        "preferences": ADDON in bpy.context.preferences.addons
        and bpy.context.preferences.addons[ADDON].preferences is not None,
        "scene settings": hasattr(bpy.types.Scene, "t2vz"),
        "status": hasattr(bpy.types.WindowManager, "t2vz_status"),
    }


def test_register_unregister_twice(scene: object) -> None:
    """``scene``: default panel settings (text to video), whatever an earlier test left."""
    from blender_t2vz import runtime

    for _ in range(2):
        addon_utils.disable(ADDON, default_set=True)
        assert not any(_registered().values()), _registered()
        assert not bpy.app.timers.is_registered(runtime._timer)
        enable_addon()
        assert all(_registered().values()), _registered()
        assert bpy.ops.t2vz.generate.poll()  # text to video needs nothing but a scene
        assert not bpy.ops.t2vz.cancel.poll()  # no job runs
    configure_prefs()


def test_generate_poll_says_what_is_missing(scene) -> None:
    """Generate is refused, with a reason, until the mode's inputs exist."""
    from blender_t2vz import runtime

    settings = scene.t2vz
    settings.mode = "controlnet"
    assert not bpy.ops.t2vz.generate.poll()  # no ControlNet and no active strip
    settings.mode = "pix2pix"
    assert not bpy.ops.t2vz.generate.poll()  # no source strip
    settings.mode = "text2video"
    assert bpy.ops.t2vz.generate.poll()
    runtime.RUNNER.job = runtime.ActiveJob("x", {}, scene.name, 1, 1, "x")
    try:
        assert bpy.ops.t2vz.generate.poll()  # while a job runs, Generate queues another
        assert bpy.ops.t2vz.cancel.poll()
    finally:
        runtime.RUNNER.job = None


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def test_addon_sources_never_import_heavy_packages() -> None:
    sources = sorted((ROOT / "blender_t2vz").rglob("*.py"))
    assert len(sources) >= 8
    for path in sources:
        bad = _imports(path) & FORBIDDEN
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_heavy_packages_not_loaded_in_blender(tmp_path: Path) -> None:
    # A fresh process: other tests of this session may load cv2 for their own checks.
    code = f"""
import os, sys
os.environ["BLENDER_USER_RESOURCES"] = {str(tmp_path)!r}
sys.path.insert(0, {str(ROOT)!r})
import bpy, addon_utils
addon_utils.enable("blender_t2vz", default_set=True)
from blender_t2vz import jobs, operators
bpy.context.scene.t2vz.prompt = "a cat"
job = operators.plan_from_panel(bpy.context).job
assert job["prompt"] == "a cat"
addon_utils.disable("blender_t2vz", default_set=True)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(FORBIDDEN - {"backend"})!r})))
sys.stdout.flush()
os._exit(0)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_manifest_and_built_zip_validate(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import build_extension
    finally:
        sys.path.remove(str(ROOT))
    tool, tags = build_extension.bpy_tools()
    # The repository's manifest as Blender's own "extension validate" sees it.
    staged = build_extension.stage(tmp_path / "staged")
    result = subprocess.run(
        [sys.executable, str(tool), "validate", f"--valid-tags={tags}", str(staged)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    zip_path = build_extension.build(tmp_path / "dist")
    import zipfile

    names = set(zipfile.ZipFile(zip_path).namelist())
    for required in (
        "blender_manifest.toml",
        "__init__.py",
        "worker_client.py",
        "backend/protocol.py",
        "presets/t2vz/Preview.py",
    ):
        assert required in names, sorted(names)
    if (ROOT / "install_deps.py").is_file():
        assert "install_deps.py" in names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)

    # A broken manifest must fail validation.
    bad = tmp_path / "bad"
    build_extension.stage(bad)
    text = (bad / "blender_manifest.toml").read_text()
    (bad / "blender_manifest.toml").write_text(text.replace('"4.2.0"', '"four"'))
    result = subprocess.run(
        [sys.executable, str(tool), "validate", f"--valid-tags={tags}", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0


@pytest.mark.slow
def test_installed_extension_finds_its_backend(addon: object, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import build_extension
    finally:
        sys.path.remove(str(ROOT))
    zip_path = build_extension.build(tmp_path / "dist")
    addon_utils.disable(ADDON, default_set=True)
    module_name = "bl_ext.user_default.blender_t2vz"
    try:
        bpy.ops.extensions.package_install_files(
            filepath=str(zip_path), repo="user_default", enable_on_install=True
        )
        assert module_name in bpy.context.preferences.addons
        assert hasattr(bpy.types, "T2VZ_OT_generate")
        paths = sys.modules[f"{module_name}.backend_paths"]
        prefs_mod = sys.modules[f"{module_name}.preferences"]
        root = paths.backend_root()
        assert (root / "backend" / "protocol.py").is_file()
        assert (root / "__init__.py").is_file() and root != ROOT
        assert paths.load_protocol().SCHEMA_VERSION >= 1
        venv = prefs_mod.venv_dir()
        assert venv.parent == prefs_mod.user_dir() and venv.name == ".venv"
    finally:
        if module_name in bpy.context.preferences.addons:
            addon_utils.disable(module_name, default_set=True)
        bpy.ops.extensions.package_uninstall(
            repo_index=_repo_index("user_default"), pkg_id="blender_t2vz"
        )
        enable_addon()
        configure_prefs()
    assert not hasattr(bpy.types, "T2VZ_OT_generate") or ADDON in bpy.context.preferences.addons


def _repo_index(module: str) -> int:
    for i, repo in enumerate(bpy.context.preferences.extensions.repos):
        if repo.module == module:
            return i
    raise LookupError(module)
