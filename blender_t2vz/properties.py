"""Settings saved with the .blend (on the Scene) and transient status (on the WindowManager)."""

import random
from typing import Any

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    FloatVectorProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from . import backend_paths, model_families, preferences, sizing

MODE_ITEMS = [
    ("text2video", "Text to Video", "Generate from the prompt alone, with motion dynamics"),
    (
        "controlnet",
        "ControlNet",
        "Follow a control video (edges, pose, depth) from a strip or the scene",
    ),
    ("pix2pix", "Video Instruct-Pix2Pix", "Edit the active strip following an instruction"),
]
DETECTOR_ITEMS = [
    ("none", "None", "The control video already is a control image sequence"),
    ("canny", "Canny Edges", "Edges detected by the backend"),
    (
        "openpose",
        "OpenPose",
        "People's poses in the backend: RT-DETR finds them, VitPose places their keypoints",
    ),
    ("depth", "Depth", "Depth Anything V2 in the backend: near is bright"),
    # controlnet-aux's (an optional extra with pickled weights: see the backend's protocol)
    ("hed", "HED", "Soft edges (controlnet-aux; pickled weights)"),
    ("lineart", "Lineart", "Line art (controlnet-aux; pickled weights)"),
    ("mlsd", "MLSD", "Straight lines (controlnet-aux; pickled weights)"),
]
# Where a ControlNet's control video comes from. SCENE is rendered from the scene camera
# by scene_control (depth, pose or edges), without a detector.
SOURCE_ITEMS = [
    ("ACTIVE_STRIP", "Active Strip", "The sequencer's active movie or image strip"),
    ("STRIP", "Strip", "A movie or image strip chosen by name"),
    ("SCENE", "3D Scene", "Passes rendered from the scene camera"),
]
SCENE_PASS_ITEMS = [
    ("DEPTH", "Depth", "Depth pass of the scene camera"),
    ("OPENPOSE", "OpenPose", "Pose keypoints of rigged characters"),
    ("CANNY", "Edges", "Edges of a render of the scene"),
]
SIZE_ITEMS = [
    (
        "NATIVE",
        "Model Native",
        "The model's native pixel count (SD 1.x: 512x512) at the scene's aspect ratio",
    ),
    (
        "PREVIEW",
        "Preview",
        "Half the native width and height (a quarter of the pixels) for quick looks",
    ),
    (
        "SCENE",
        "Scene",
        "The scene's resolution (times its %): slow and repetitive far above native",
    ),
    ("CUSTOM", "Custom", "Width and height set here"),
]
STATE_ITEMS = [
    ("IDLE", "Idle", ""),
    ("STARTING", "Starting", "The backend worker is starting"),
    ("RUNNING", "Running", "A job is running"),
    ("CANCELLING", "Cancelling", "Waiting for the job to stop"),
]
MAX_SEED = 2**31 - 1
# Which scene frames a job without a source strip covers (text to video, scene-driven
# ControlNets): from the current frame, or the scene's or the preview range.
FRAME_RANGE_ITEMS = [
    ("CURRENT", "From Current Frame", "Frames from the current frame on, as many as Frames"),
    ("SCENE", "Scene Range", "The scene's frame range (Start to End)"),
    (
        "PREVIEW",
        "Preview Range",
        "The timeline's preview range (the scene's range while no preview range is set)",
    ),
]


class T2VZ_ControlNetItem(bpy.types.PropertyGroup):
    """One ControlNet of a job: where its control video comes from, model and weight."""

    enabled: BoolProperty(name="Enabled", default=True)
    source: EnumProperty(name="Source", items=SOURCE_ITEMS, default="ACTIVE_STRIP")
    strip_name: StringProperty(name="Strip", description="The strip used as control video")
    detector: EnumProperty(
        name="Detector",
        items=DETECTOR_ITEMS,
        default="canny",
        description="Turns the strip's frames into control images in the backend",
    )
    scene_pass: EnumProperty(name="Pass", items=SCENE_PASS_ITEMS, default="DEPTH")
    model: StringProperty(
        name="Model",
        description="ControlNet hub id or local folder; empty: the preferences' model for the detector",
    )
    weight: FloatProperty(name="Weight", default=1.0, min=0.0, max=10.0, soft_max=2.0)

    def to_values(self) -> dict[str, Any]:
        """The entry as plain values for jobs.build_job."""
        detector = self.detector
        values = {"model": self.model.strip(), "weight": self.weight, "detector": detector}
        if self.source == "SCENE":
            # Scene passes are ready control images: no backend detector, except canny on
            # the flat-shaded pass. ``model_kind`` picks the preferences' default model.
            kind = {"DEPTH": "depth", "OPENPOSE": "openpose", "CANNY": "canny"}[self.scene_pass]
            edges = getattr(getattr(self, "scene_control", None), "edges", "CANNY")
            values["detector"] = "canny" if kind == "canny" and edges == "CANNY" else "none"
            values["model_kind"] = kind
        return values


# The job's ``fit`` (backend/protocol.py FITS) for input strips of another aspect ratio.
FIT_ITEMS = [
    ("crop", "Crop", "Scale the input to cover the frame and crop what sticks out (centred)"),
    ("pad", "Pad", "Fit the whole input inside the frame, centred on black"),
    ("stretch", "Stretch", "Scale width and height separately (distorts the input)"),
]

# The job's ``prediction_type`` (backend/protocol.py PREDICTION_TYPES), "AUTO": none sent.
PREDICTION_ITEMS = [
    (
        "AUTO",
        "Model's Own",
        "What the model says: its scheduler config, or a single file's metadata "
        "(modelspec.prediction_type); an SD 2.x single file that says nothing runs as the "
        "768 px v-prediction model",
    ),
    (
        "epsilon",
        "Epsilon",
        "The UNet predicts the noise: SD 1.x, SDXL and SD 2.x at 512 px (2-1-base). An SD 2.x "
        "single file loads with the 512 px configs",
    ),
    (
        "v_prediction",
        "V-Prediction",
        "The UNet predicts v: SD 2.x at 768 px (2-1). An SD 2.x single file loads with the "
        "768 px configs",
    ),
]

ADAPTER_KIND_ITEMS = [
    ("LORA", "LoRA", "Low-rank weights added to the base model, with a weight"),
    ("EMBEDDING", "Embedding", "A textual inversion embedding, called by its token in the prompt"),
]


# Blender 5.0 warns when a "//" path is set on a property not marked as taking one; 4.2 and
# 4.5 do not know the option (and refuse unknown ones).
_BLEND_RELATIVE = (
    {"PATH_SUPPORTS_BLEND_RELATIVE"}
    if "is_path_supports_blend_relative" in bpy.types.Property.bl_rna.properties
    else set()
)


def _abspath(path: str) -> str:
    """A blend-relative path (//...) made absolute; hub ids and absolute paths stay."""
    path = path.strip()
    return bpy.path.abspath(path) if path.startswith("//") else path


class T2VZ_AdapterItem(bpy.types.PropertyGroup):
    """One LoRA or textual inversion embedding applied to the base model for a job."""

    enabled: BoolProperty(name="Enabled", default=True)
    kind: EnumProperty(name="Kind", items=ADAPTER_KIND_ITEMS, default="LORA")
    path: StringProperty(
        name="File",
        subtype="FILE_PATH",
        options=_BLEND_RELATIVE,
        description="A .safetensors file, a folder holding one, or a hub id: owner/name, or "
        "owner/name/path/file.safetensors for one file of a repo",
    )
    weight: FloatProperty(
        name="Weight",
        default=1.0,
        min=-10.0,
        max=10.0,
        soft_min=-2.0,
        soft_max=2.0,
        description="LoRA strength: 0 has no effect, 1 as trained, negative inverts it",
    )
    token: StringProperty(
        name="Token",
        description="The word that calls the embedding in the prompt, e.g. <my-style>",
    )

    def to_values(self) -> dict[str, Any]:
        """The entry as plain values: {path, weight} for a LoRA, {path, token} otherwise."""
        if self.kind == "LORA":
            return {"kind": "lora", "path": _abspath(self.path), "weight": self.weight}
        return {"kind": "embedding", "path": _abspath(self.path), "token": self.token.strip()}


def _look_texts(field: str) -> set[str]:
    """The added prompts (or negative prompts) of the protocol's official looks."""
    presets = getattr(backend_paths.load_protocol(), "PRESETS", {})
    return {getattr(p, field) for p in presets.values() if getattr(p, field)}


def _size_update(self: "T2VZ_SceneSettings", context: Any) -> None:
    # Switching to a custom size starts from the model's native size at the scene's aspect.
    if self.size_mode == "CUSTOM" and context and context.scene:
        self.width, self.height = self.native_size(context.scene)


class T2VZ_SceneSettings(bpy.types.PropertyGroup):
    """A job's settings, saved with the .blend (``scene.t2vz``)."""

    mode: EnumProperty(name="Mode", items=MODE_ITEMS, default="text2video")
    prompt: StringProperty(name="Prompt", description="What to generate (pix2pix: the edit)")
    negative_prompt: StringProperty(
        name="Negative Prompt", description="What to keep out of the picture"
    )
    model: StringProperty(
        name="Base Model",
        description="Hub id, diffusers folder or .safetensors file; empty: the preferences' model",
    )
    controlnets: CollectionProperty(type=T2VZ_ControlNetItem)
    controlnet_index: IntProperty(name="Active ControlNet", default=0, min=0)
    adapters: CollectionProperty(type=T2VZ_AdapterItem)
    adapter_index: IntProperty(name="Active LoRA or Embedding", default=0, min=0)
    seed: IntProperty(name="Seed", default=0, min=0, max=MAX_SEED)
    # At most the protocol's MAX_STEPS: an SD 1.x schedule has 1000 timesteps.
    steps: IntProperty(name="Steps", default=50, min=2, max=999, soft_max=150)
    guidance: FloatProperty(name="Guidance", default=7.5, min=0.0, max=100.0, soft_max=20.0)
    image_guidance: FloatProperty(
        name="Image Guidance",
        default=1.5,
        min=0.0,
        max=100.0,
        soft_max=5.0,
        description="How closely pix2pix follows the source video",
    )
    motion: FloatVectorProperty(
        name="Motion",
        size=2,
        default=(12.0, 12.0),
        min=-512.0,
        max=512.0,
        soft_min=-64.0,
        soft_max=64.0,
        description="How far the virtual camera pans each frame, in 1/512 of the frame "
        "(x right, y down): 12 moves the picture about 2% of its width a frame; 0, 0 holds "
        "the shot still",
    )
    frames: IntProperty(
        name="Frames",
        default=8,
        min=1,
        max=100_000,
        soft_max=256,
        description="How many frames the clip has",
    )
    frame_range: EnumProperty(
        name="Frame Range",
        items=FRAME_RANGE_ITEMS,
        default="CURRENT",
        description="Which scene frames the clip covers when no source strip sets them",
    )
    match_source: BoolProperty(
        name="Match Source Strip",
        default=True,
        description="Generate as many frames as the source strip shows",
    )
    size_mode: EnumProperty(
        name="Size",
        items=SIZE_ITEMS,
        default="NATIVE",
        description="The job's width and height",
        update=_size_update,
    )
    width: IntProperty(name="Width", default=512, min=64, max=4096, step=8)
    fit: EnumProperty(
        name="Fit",
        items=FIT_ITEMS,
        default="crop",
        description="How a source or control strip of another aspect ratio meets the size",
    )
    height: IntProperty(name="Height", default=512, min=64, max=4096, step=8)
    chunk_size: IntProperty(
        name="Chunk Size",
        default=8,
        min=1,
        max=100_000,
        soft_max=64,
        description="How many frames are denoised at once. Lower it if the job runs out "
        "of memory; raise it to go faster on a GPU with memory to spare. The picture is the "
        "same either way",
    )
    custom_timesteps: BoolProperty(
        name="Custom t0/t1",
        default=False,
        description="Set when the motion is applied (text to video); off: the paper's "
        "defaults, 44 and 47 of 50 steps, scaled to the step count",
    )
    t0: IntProperty(
        name="t0",
        default=44,
        min=0,
        max=998,
        description="Step at which the panned copies of frame 1 are taken. Lower (with t1) "
        "moves the pan earlier, when the picture is still rough: steadier shapes on small "
        "models (the built-in shapes model: 8 and 10 of 20 steps)",
    )
    t1: IntProperty(
        name="t1",
        default=47,
        min=1,
        max=998,
        description="Step from which all frames are denoised together; above t0, below "
        "Steps. Frame 1 alone runs the steps before it",
    )
    prediction_type: EnumProperty(
        name="Prediction",
        items=PREDICTION_ITEMS,
        default="AUTO",
        description="What the model's UNet predicts. The weights cannot tell: a wrong choice "
        "gives washed-out or noisy pictures. Needed for an SD 2.x single file at 512 px "
        "(2-1-base fine-tunes) whose file does not say",
    )
    smooth_bg: BoolProperty(name="Background Smoothing", default=False)
    consistency: EnumProperty(
        name="Consistency",
        items=(
            ("paper", "Paper", "Cross-frame attention to frame 1 only (Text2Video-Zero)"),
            (
                "flow",
                "Flow",
                "Also tie each frame to the previous one along the motion of the source or "
                "control video (a 3D scene control: Blender's exact motion vectors): steadier "
                "textures; a partial frame range also computes the frames before it",
            ),
        ),
        default="paper",
        description="How frames are kept consistent with each other",
    )
    smooth_alpha: FloatProperty(name="Smoothing", default=0.6, min=0.0, max=1.0)
    output_dir: StringProperty(
        name="Output",
        subtype="DIR_PATH",
        options=_BLEND_RELATIVE,
        default="//t2vz/",
        description="Results go to a new folder in here (unsaved file: the system temp folder)",
    )
    write_mp4: BoolProperty(name="Also Write MP4", default=False)

    @staticmethod
    def scene_size(scene: Any) -> tuple[int, int]:
        """The scene's render size, scaled and rounded to multiples of 8."""
        r = scene.render
        return sizing.scene_size(r.resolution_x, r.resolution_y, r.resolution_percentage)

    def size_model(self) -> str:
        """The base model the job will use (the panel's, else the preferences' for the mode)."""
        if self.model.strip():
            return self.model.strip()
        prefs = preferences.get_prefs()
        return prefs.pix2pix_model if self.mode == "pix2pix" else prefs.model

    def native_side(self) -> int:
        """The side of the square the job's model was trained at, in pixels (an SD 2.x
        single file: 512 when it runs as an epsilon model)."""
        return model_families.native_side(self.size_model(), self.job_prediction_type())

    def job_prediction_type(self) -> str | None:
        """The job's ``prediction_type``: None for the model's own."""
        return None if self.prediction_type == "AUTO" else self.prediction_type

    def native_size(self, scene: Any) -> tuple[int, int]:
        """The model's native pixel count at the scene's aspect ratio, multiples of 8."""
        r = scene.render
        return sizing.native_size(r.resolution_x, r.resolution_y, self.native_side())

    def size(self, scene: Any) -> tuple[int, int]:
        """The job's width and height."""
        if self.size_mode == "NATIVE":
            return self.native_size(scene)
        if self.size_mode == "PREVIEW":
            r = scene.render
            return sizing.native_size(r.resolution_x, r.resolution_y, self.native_side() // 2)
        if self.size_mode == "SCENE":
            return self.scene_size(scene)
        return sizing.round_to_8(self.width), sizing.round_to_8(self.height)

    def enabled_controlnets(self) -> list[T2VZ_ControlNetItem]:
        """The ControlNet entries that take part in a job."""
        return [c for c in self.controlnets if c.enabled]

    def to_values(self, scene: Any, device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
        """The settings as plain values for jobs.build_job."""
        width, height = self.size(scene)
        return {
            "mode": self.mode,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": self.model.strip(),
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "image_guidance": self.image_guidance,
            "motion": (self.motion[0], self.motion[1]),
            "frames": self.frames,
            "match_source": self.match_source,
            "width": width,
            "height": height,
            "fit": self.fit,
            "chunk_size": self.chunk_size,
            "t0": self.t0 if self.custom_timesteps else None,
            "t1": self.t1 if self.custom_timesteps else None,
            "smooth_bg": self.smooth_bg,
            "smooth_alpha": self.smooth_alpha,
            "consistency": self.consistency,
            "prediction_type": self.job_prediction_type(),
            "device": device,
            "dtype": dtype,
            "write_mp4": self.write_mp4,
            "controlnets": [c.to_values() for c in self.enabled_controlnets()],
            "adapters": [a.to_values() for a in self.adapters if a.enabled],
        }

    def append_to_prompt(self, words: str) -> None:
        """Add ``words`` to the end of the prompt field (a preset's look, shown in the field)."""
        self.prompt = backend_paths.load_protocol().with_added_prompt(self.prompt, words)

    def use_look_words(self, words: str) -> None:
        """End the prompt with a look's ``words``, replacing any other official look's words
        there (switching looks never piles them up)."""
        prompt = self.prompt.rstrip()
        for other in sorted(_look_texts("added_prompt"), key=len, reverse=True):
            if other != words and prompt.endswith(other):
                prompt = prompt[: -len(other)].rstrip().rstrip(",").rstrip()
        self.prompt = backend_paths.load_protocol().with_added_prompt(prompt, words)

    def use_look_negative(self, text: str) -> None:
        """Put a look's negative prompt in the field when it is empty or holds another
        official look's; the artist's own negative prompt stays."""
        current = self.negative_prompt.strip()
        if not current or current in _look_texts("negative_prompt"):
            self.negative_prompt = text

    def fill_negative_prompt(self, text: str) -> None:
        """Put ``text`` in the negative prompt field when it is empty."""
        if not self.negative_prompt.strip():
            self.negative_prompt = text

    def randomize_seed(self) -> int:
        """Pick a new random seed and return it."""
        self.seed = random.randint(0, MAX_SEED)
        return self.seed


class T2VZ_CachedModel(bpy.types.PropertyGroup):
    """A model in the backend's hub cache, as the worker listed it."""

    model: StringProperty(name="Model")
    # Bytes, as a float: IntProperty is 32-bit and models pass 2 GB.
    size: FloatProperty(name="Size", default=0.0, min=0.0)
    complete: BoolProperty(name="Complete", default=True)


class T2VZ_Status(bpy.types.PropertyGroup):
    """What the add-on is doing right now; never saved (``window_manager.t2vz_status``)."""

    state: EnumProperty(name="State", items=STATE_ITEMS, default="IDLE")
    progress: FloatProperty(name="Progress", default=0.0, min=0.0, max=1.0, subtype="FACTOR")
    message: StringProperty(name="Status")
    error: StringProperty(name="Error")
    preview_path: StringProperty(name="Preview", subtype="FILE_PATH")
    worker_pid: IntProperty(name="Worker PID", default=0)
    install_running: BoolProperty(name="Installing", default=False)
    install_message: StringProperty(name="Install Status")
    install_error: StringProperty(name="Install Error")
    cached_models: CollectionProperty(type=T2VZ_CachedModel)
    cache_dir: StringProperty(name="Model Cache Folder")
    cache_listed: BoolProperty(name="Cache Listed", default=False)
    cache_message: StringProperty(name="Cache Status")
    # The result strip the status message announces (cleared when undo removes it).
    result_strip: StringProperty(name="Result Strip")
    result_scene: StringProperty(name="Result Scene")


classes = (
    T2VZ_ControlNetItem,
    T2VZ_AdapterItem,
    T2VZ_SceneSettings,
    T2VZ_CachedModel,
    T2VZ_Status,
)


def register() -> None:
    """Register the property groups and attach them to Scene and WindowManager."""
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.t2vz = PointerProperty(type=T2VZ_SceneSettings)
    bpy.types.WindowManager.t2vz_status = PointerProperty(type=T2VZ_Status)


def unregister() -> None:
    """Detach and unregister the property groups."""
    del bpy.types.WindowManager.t2vz_status
    del bpy.types.Scene.t2vz
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
