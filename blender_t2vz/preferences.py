"""Add-on preferences: the backend environment, default models, device."""

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import backend_paths

ADDON_ID = __package__

DEVICE_ITEMS = [
    ("auto", "Auto", "CUDA if available, else Apple MPS, else CPU"),
    ("cuda", "CUDA", "NVIDIA GPU"),
    ("mps", "MPS", "Apple GPU"),
    ("cpu", "CPU", "Slow, but works everywhere"),
]
DTYPE_ITEMS = [
    ("auto", "Auto", "float16 on GPUs; on the CPU bfloat16 where it has native bf16, else float32"),
    ("float32", "float32", ""),
    ("float16", "float16", ""),
    ("bfloat16", "bfloat16", ""),
]
TORCH_ITEMS = [
    ("auto", "Auto", "CUDA build where an NVIDIA driver is found"),
    ("cuda", "CUDA", "CUDA build of PyTorch"),
    ("cpu", "CPU", "CPU-only build of PyTorch (smaller download)"),
]
# The preferences' ControlNet per kind starts as the default model's family's (SD 1.x).
_SD1_CONTROLNETS = {
    "canny": "lllyasviel/sd-controlnet-canny",
    "openpose": "lllyasviel/sd-controlnet-openpose",
    "depth": "lllyasviel/sd-controlnet-depth",
}
# A preferences' ControlNet of another family than the job's base model gives way to the
# base family's own (the protocol's DEFAULT_CONTROLNETS): see jobs._controlnet_model.
CONTROLNET_DESCRIPTION = (
    "ControlNet hub id, folder or file for {kind} control. With a base model of another "
    "family (SD 1.x, 2.x, SDXL) the base family's own {kind} ControlNet is used instead"
)


class EnvironmentMissingError(RuntimeError):
    """No usable backend python; the message says what to click."""


def _defaults() -> dict[str, str]:
    try:
        protocol = backend_paths.load_protocol()
        return {
            "model": protocol.DEFAULT_MODEL,
            "pix2pix": protocol.DEFAULT_PIX2PIX_MODEL,
            **protocol.DEFAULT_CONTROLNETS[protocol.KNOWN_MODELS[protocol.DEFAULT_MODEL]],
        }
    except (backend_paths.BackendNotFoundError, ImportError):
        return {
            "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "pix2pix": "timbrooks/instruct-pix2pix",
            **_SD1_CONTROLNETS,
        }


_DEFAULTS = _defaults()
DEFAULT_CONTROLNETS = {kind: _DEFAULTS[kind] for kind in ("canny", "openpose", "depth")}


class T2VZ_Preferences(bpy.types.AddonPreferences):
    """Where the backend lives and which models it loads by default."""

    bl_idname = ADDON_ID

    python_path: StringProperty(
        name="Backend Python",
        subtype="FILE_PATH",
        description="Python of the backend environment; empty: the one 'Install Backend' made",
    )
    torch_variant: EnumProperty(name="PyTorch", items=TORCH_ITEMS, default="auto")
    install_detectors: BoolProperty(
        name="Detectors",
        default=False,
        description="Also install the HED, Lineart and MLSD detectors (controlnet-aux with a "
        "torchvision matching the installed PyTorch; their weights are pickled). OpenPose and "
        "Depth need nothing extra",
    )
    install_cluster: BoolProperty(
        name="Ray",
        default=False,
        description="Also install Ray, to send jobs to a Ray cluster (see Ray Cluster below). "
        "Not needed to generate on this computer",
    )
    model: StringProperty(name="Base Model", default=_DEFAULTS["model"])
    pix2pix_model: StringProperty(name="Pix2Pix Model", default=_DEFAULTS["pix2pix"])
    controlnet_canny: StringProperty(
        name="ControlNet Canny",
        default=DEFAULT_CONTROLNETS["canny"],
        description=CONTROLNET_DESCRIPTION.format(kind="Canny"),
    )
    controlnet_openpose: StringProperty(
        name="ControlNet OpenPose",
        default=DEFAULT_CONTROLNETS["openpose"],
        description=CONTROLNET_DESCRIPTION.format(kind="OpenPose"),
    )
    controlnet_depth: StringProperty(
        name="ControlNet Depth",
        default=DEFAULT_CONTROLNETS["depth"],
        description=CONTROLNET_DESCRIPTION.format(kind="Depth"),
    )
    models_dir: StringProperty(
        name="Model Cache",
        subtype="DIR_PATH",
        description="Where downloaded models are kept (HF_HOME); empty: the Hugging Face default",
    )
    device: EnumProperty(name="Device", items=DEVICE_ITEMS, default="auto")
    dtype: EnumProperty(name="Precision", items=DTYPE_ITEMS, default="auto")
    allow_pickle: BoolProperty(
        name="Allow Pickled Weights",
        default=False,
        description="Load .ckpt/.bin/.pt weights too. Unpickling can run arbitrary code: only "
        "for sources you trust. A job file cannot turn this on",
    )
    compile_unet: BoolProperty(
        name="Compile the UNet (first job slower, later jobs faster)",
        default=False,
        description="torch.compile the UNet and ControlNets in the backend. The first job of a "
        "model and size compiles (about a minute on a GPU), later jobs in the same session "
        "run faster. Best on a GPU; on a CPU it measured slower. Falls back to uncompiled "
        "with a warning where compiling fails",
    )
    cluster_address: StringProperty(
        name="Cluster Address",
        description="host:port of a Ray cluster's head (python3 install_deps.py --cluster; "
        "README: Long videos on a Ray cluster): jobs' frames then run on its GPUs. Empty: "
        "jobs run on this machine",
    )
    cluster_token: StringProperty(
        name="Cluster Token",
        subtype="PASSWORD",
        description="The cluster's Ray auth token (`ray get-auth-token` on the head); needed "
        "for any address but this machine's. Whoever reaches a cluster can run code on it",
    )
    cluster_shard_size: IntProperty(
        name="Frames per Shard",
        default=0,
        min=0,
        soft_max=256,
        description="How many frames each cluster worker computes at a time (rounded to the "
        "job's chunks). 0: the job's frames shared evenly over the cluster's GPUs. Smaller "
        "shards spread a long video over more GPUs and retry less after a lost worker; each "
        "shard also computes frame 1, the anchor",
    )
    # The speed of the last jobs by model and device (runtime.remember_speed), saved with the
    # preferences so the first long job of the next session shows its estimate too.
    job_speeds: StringProperty(name="Job Speeds", default="{}", options={"HIDDEN"})

    def draw(self, context: Any) -> None:
        layout = self.layout
        status = context.window_manager.t2vz_status
        box = layout.box()
        box.label(text="Backend Environment", icon="CONSOLE")
        box.prop(self, "python_path")
        python = backend_paths.find_python(self.python_path, user_dir())
        if python is not None and python.is_file():
            box.label(text=f"Using {python}", icon="CHECKMARK")
        else:
            box.label(text="No backend environment yet: click 'Install Backend'", icon="ERROR")
        row = box.row(align=True)
        row.prop(self, "torch_variant")
        if status.install_running:
            row.operator("t2vz.install_cancel", text="Stop Install", icon="CANCEL")
            box.label(text=status.install_message or "Installing...", icon="SORTTIME")
        else:
            row.prop(self, "install_detectors")
            row.prop(self, "install_cluster")
            row.operator("t2vz.install_backend", icon="IMPORT")
            if not online_access():
                box.label(text=OFFLINE_INSTALL, icon="INTERNET_OFFLINE")
            if status.install_error:
                box.label(text=status.install_error, icon="ERROR")
            elif status.install_message:
                box.label(text=status.install_message, icon="INFO")
        box.operator("t2vz.restart_worker", icon="FILE_REFRESH")

        box = layout.box()
        box.label(text="Models (hub ids, files of hub repos or local paths)", icon="FILE_FOLDER")
        for name in (
            "model",
            "pix2pix_model",
            "controlnet_canny",
            "controlnet_openpose",
            "controlnet_depth",
        ):
            kind = "controlnet" if name.startswith("controlnet") else "model"
            draw_hub_field(box, self, name, kind)
        box.prop(self, "models_dir")
        box.prop(self, "allow_pickle")
        self.draw_cache(layout, status)
        row = layout.row()
        row.prop(self, "device")
        row.prop(self, "dtype")
        layout.prop(self, "compile_unet")
        from . import cluster_connection

        cluster_connection.draw(layout, self)

    def draw_cache(self, layout: Any, status: Any) -> None:
        """The models in the backend's hub cache, a download in progress, Remove buttons."""
        from . import runtime

        box = layout.box()
        row = box.row()
        row.label(text="Downloaded Models", icon="DISK_DRIVE")
        row.operator("t2vz.models_refresh", text="", icon="FILE_REFRESH")
        if not online_access():
            box.label(text=OFFLINE_WORKER, icon="INTERNET_OFFLINE")
        job = runtime.RUNNER.job
        if job is not None and job.kind == "fetch":
            row = box.row(align=True)
            if hasattr(row, "progress"):  # Blender 4.0+
                row.progress(factor=status.progress, type="BAR", text=status.message)
            else:
                row.label(text=status.message)
            row.operator("t2vz.cancel", text="", icon="CANCEL")
        if status.cache_listed:
            for item in status.cached_models:
                row = box.row(align=True)
                suffix = "" if item.complete else " (incomplete)"
                row.label(text=item.model + suffix, icon="FILE_3D")
                row.label(text=runtime.format_bytes(item.size))
                row.operator("t2vz.model_remove", text="", icon="TRASH").model = item.model
            if not status.cached_models:
                box.label(text="No models downloaded yet")
            if status.cache_dir:
                box.label(text=f"In {status.cache_dir}")
        else:
            box.label(text="Click the refresh button to list them (the backend starts)")
        if status.cache_message:
            box.label(text=status.cache_message, icon="INFO")


OFFLINE_INSTALL = (
    "Allow Online Access is off (Preferences > System > Network): Install Backend "
    "downloads PyTorch and other packages, so it will not run"
)
OFFLINE_WORKER = (
    "Allow Online Access is off: the backend runs offline (HF_HUB_OFFLINE=1) and uses "
    "downloaded models only"
)


def online_access() -> bool:
    """Blender's "Allow Online Access" (Preferences > System > Network); True before 4.2."""
    return bool(getattr(bpy.app, "online_access", True))


def is_hub_id(name: str) -> bool:
    """True for a Hugging Face hub id (owner/name, or owner/name/path/file.safetensors for
    one file of a repo), not a path that exists or a built-in model."""
    name = name.strip()
    try:
        problem = backend_paths.load_protocol().hub_id_problem(name)
    except (backend_paths.BackendNotFoundError, ImportError):
        return False
    return not problem and not Path(bpy.path.abspath(name)).exists()


def draw_hub_field(layout: Any, data: Any, name: str, kind: str) -> Any:
    """Field ``name`` of ``data``, with a download button when it holds a hub id: fetched
    now, with progress and ESC, rather than at the start of the next job. Returns its row."""
    row = layout.row(align=True)
    row.prop(data, name)
    value = getattr(data, name)
    if is_hub_id(value):
        download = row.operator("t2vz.model_download", text="", icon="IMPORT")
        download.model = value.strip()
        download.kind = kind
    return row


def get_prefs(context: Any = None) -> Any:
    """The add-on's preferences, or their defaults when the add-on is not enabled by name."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    if addon is not None and addon.preferences is not None:
        return addon.preferences
    values = {}
    for name, prop in T2VZ_Preferences.__annotations__.items():
        values[name] = prop.keywords.get("default", "")
    return SimpleNamespace(**values)


def user_dir(create: bool = False) -> Path | None:
    """The extension's user folder (for its environment), or None outside an extension."""
    if not ADDON_ID.startswith("bl_ext."):
        return None
    try:
        return Path(bpy.utils.extension_path_user(ADDON_ID, create=create))
    except (ValueError, AttributeError):
        return None


def backend_python(prefs: Any) -> Path | None:
    """The backend python if one is configured or installed (it may not exist), else None."""
    return backend_paths.find_python(prefs.python_path, user_dir())


def resolve_python(prefs: Any) -> Path:
    """The backend environment's python, or EnvironmentMissingError saying what to click."""
    python = backend_paths.find_python(prefs.python_path, user_dir())
    if python is None:
        raise EnvironmentMissingError(
            "No backend environment: open Edit > Preferences > Add-ons > Text2Video-Zero "
            "and click 'Install Backend' (or set 'Backend Python')"
        )
    if not python.is_file():
        raise EnvironmentMissingError(
            f"Backend Python not found: {python}. Fix 'Backend Python' in the add-on's "
            "preferences, or clear it and click 'Install Backend'"
        )
    return python


def model_defaults(prefs: Any) -> dict[str, Any]:
    """The preferences' models, in the shape jobs.build_job takes as ``defaults``."""
    return {
        "model": prefs.model,
        "pix2pix_model": prefs.pix2pix_model,
        "controlnet_models": {
            "canny": prefs.controlnet_canny,
            "none": prefs.controlnet_canny,
            "openpose": prefs.controlnet_openpose,
            "depth": prefs.controlnet_depth,
        },
    }


def worker_env(prefs: Any, online: bool | None = None) -> dict[str, str]:
    """Extra environment variables for the backend worker.

    ``online``: Blender's "Allow Online Access" (read when None); off, the worker runs with
    HF_HUB_OFFLINE=1 and never asks the Hub, using downloaded models only.
    """
    env = {}
    if prefs.models_dir.strip():
        env["HF_HOME"] = str(Path(bpy.path.abspath(prefs.models_dir)).resolve())
    if not (online_access() if online is None else online):
        env["HF_HUB_OFFLINE"] = "1"
    address = getattr(prefs, "cluster_address", "").strip()
    if address:  # the worker sends the jobs' frames there (serve reads $T2VZ_CLUSTER)
        env["T2VZ_CLUSTER"] = address
        token = getattr(prefs, "cluster_token", "").strip()
        if token:
            env["T2VZ_CLUSTER_TOKEN"] = token
        shard_size = int(getattr(prefs, "cluster_shard_size", 0))
        if shard_size > 0:
            env["T2VZ_CLUSTER_SHARD_SIZE"] = str(shard_size)
    return env


def venv_dir() -> Path:
    """Where 'Install Backend' creates the environment."""
    return backend_paths.default_venv(user_dir(create=True))


def register() -> None:
    """Register the preferences class (and the cluster's Test Connection)."""
    from . import cluster_connection

    bpy.utils.register_class(T2VZ_Preferences)
    cluster_connection.register()


def unregister() -> None:
    """Unregister the preferences class (and the cluster's Test Connection)."""
    from . import cluster_connection

    cluster_connection.unregister()
    bpy.utils.unregister_class(T2VZ_Preferences)
