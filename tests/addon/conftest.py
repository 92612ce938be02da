"""Add-on tests in real Blender through the ``bpy`` module, headless.

bpy is imported once for the whole session with BLENDER_USER_RESOURCES in a temp folder.
Blender 4.2/4.5 can crash or hang at interpreter exit, so once pytest has printed its
summary the process ends hard with pytest's own exit status.
"""

import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_RESOURCES = tempfile.mkdtemp(prefix="t2vz_blender_res_")
os.environ["BLENDER_USER_RESOURCES"] = _RESOURCES
# Tiny built-in models are built once and reused between runs.
os.environ.setdefault("T2VZ_CACHE_DIR", str(Path(tempfile.gettempdir()) / "t2vz_test_cache"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# isort: off
import bpy  # noqa: E402  (first: it puts Blender's modules on sys.path)
import addon_utils  # noqa: E402
# isort: on

ADDON = "blender_t2vz"
# The backend's python: this one (it has torch), or, when these tests run under another
# Blender version's bpy environment, one given by T2VZ_TEST_BACKEND_PYTHON.
BACKEND_PYTHON = os.environ.get("T2VZ_TEST_BACKEND_PYTHON") or sys.executable
_exit_status: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Unregister, then end the process hard: bpy may hang at interpreter exit (not under
    mutmut, whose process runs pytest several times)."""
    # Under mutation testing the teardown runs the add-on's own code, not a mutant: in
    # mutmut's forced-fail run every add-on function raises, and a half-done unregister left
    # its classes registered, so enabling it failed in every later run of that process.
    mutant = os.environ.get("MUTANT_UNDER_TEST")
    if mutant is not None:
        os.environ["MUTANT_UNDER_TEST"] = ""  # no module of that name: original functions
    try:
        if ADDON in bpy.context.preferences.addons:
            addon_utils.disable(ADDON, default_set=True)
    finally:
        if mutant is not None:
            os.environ["MUTANT_UNDER_TEST"] = mutant
        shutil.rmtree(_RESOURCES, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # Under mutation testing pytest runs inside mutmut's process, which must live on
        # (tools/mutation.py); mutmut sets this variable before any test runs.
        if "MUTANT_UNDER_TEST" not in os.environ:
            os._exit(_exit_status.get("status", 0))


def enable_addon() -> object:
    """Enable the add-on from the repository by its module name."""
    module = addon_utils.enable(ADDON, default_set=True, handle_error=_raise)
    assert module is not None, "add-on failed to enable"
    return module


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.fixture(scope="session")
def addon() -> object:
    """The enabled add-on module, with the test venv's python as backend python."""
    module = enable_addon()
    configure_prefs()
    return module


def configure_prefs() -> None:
    """Point the preferences at this venv's python and the tiny built-in models."""
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.python_path = BACKEND_PYTHON
    prefs.model = "builtin:tiny"
    prefs.pix2pix_model = "builtin:tiny-pix2pix"
    for name in ("controlnet_canny", "controlnet_openpose", "controlnet_depth"):
        setattr(prefs, name, "builtin:tiny-controlnet")
    prefs.device = "cpu"


@pytest.fixture
def scene(addon: object, tmp_path: Path) -> bpy.types.Scene:
    """The context scene with no strips, default panel settings and a tiny job size."""
    return reset_scene(bpy.context.scene, tmp_path)


@pytest.fixture
def fresh_scene(addon: object, tmp_path: Path) -> bpy.types.Scene:
    """A new, empty, unsaved .blend (File > New) and a fresh output folder: the first
    minutes of a new project, with no pass cache and no staged inputs anywhere."""
    from blender_t2vz import runtime

    assert not runtime.RUNNER.busy, "a previous test left a job running"
    bpy.ops.wm.read_homefile(use_empty=True)
    assert not bpy.data.filepath and not bpy.data.objects
    return reset_scene(bpy.context.scene, tmp_path)


def reset_scene(scene: bpy.types.Scene, tmp_path: Path) -> bpy.types.Scene:
    """``scene`` with no strips, default panel settings, a tiny job size and its output in
    ``tmp_path/out``; the status cleared."""
    from blender_t2vz import runtime

    assert not runtime.RUNNER.busy, "a previous test left a job running"
    scene.sequence_editor_clear()
    scene.sequence_editor_create()
    settings = scene.t2vz
    settings.controlnets.clear()
    for prop in settings.bl_rna.properties:
        if prop.identifier not in {"rna_type", "name", "controlnets"}:
            settings.property_unset(prop.identifier)
    scene.render.resolution_x = 64
    scene.render.resolution_y = 64
    scene.render.resolution_percentage = 100
    scene.render.fps = 24
    scene.render.fps_base = 1.0
    scene.frame_current = 1
    settings.output_dir = str(tmp_path / "out") + os.sep
    settings.steps = 2
    settings.frames = 3
    settings.seed = 3
    status = bpy.context.window_manager.t2vz_status
    status.error = ""
    status.message = ""
    status.progress = 0.0
    return scene


def color_strip(editor: object, name: str, channel: int, start: int, length: int) -> object:
    """A user's colour strip: ``length`` in 4.5+/5.0, ``frame_end`` in 4.2."""
    from blender_t2vz import strips

    collection = strips.top_strips(editor)
    params = collection.bl_rna.functions["new_effect"].parameters.keys()
    kwargs = {"length": length} if "length" in params else {"frame_end": start + length}
    return collection.new_effect(
        name=name, type="COLOR", channel=channel, frame_start=start, **kwargs
    )


def write_png(path: Path, width: int, height: int, rgb: tuple[int, int, int]) -> Path:
    """A flat-colour RGB PNG written with the standard library only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(row * height))
    png += chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Six 64x64 frames img_1.png ... img_6.png with an edge in each."""
    folder = tmp_path / "user_frames"
    for i in range(1, 7):
        write_png(folder / f"img_{i}.png", 64, 64, (40 * i, 255 - 40 * i, 128))
    return folder
