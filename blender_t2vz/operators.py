"""Operators: generate, regenerate, cancel, and the small helpers of the panel.

Operators gather values from Blender, call the plain logic (jobs, strips, runtime) and
turn its exceptions into ``self.report``. Jobs run in the background: ``invoke`` adds a
modal handler that listens for ESC, a ``bpy.app.timers`` timer applies the worker's
messages (``runtime.step``); ``execute`` (scripts) relies on the timer alone.
"""

import contextlib
import importlib
import json
import tempfile
import textwrap
import uuid
from pathlib import Path
from typing import Any

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from . import backend_paths, capabilities, jobs, model_families, preferences, runtime, strips
from .properties import ADAPTER_KIND_ITEMS
from .worker_client import WorkerError

SCENE_CONTROL_MODULE = "scene_control"
# Staged inputs of each job, under the output folder; the scene passes' cache sits beside
# them (scene_control.addon.CACHE_FOLDER).
INPUTS_FOLDER = ".t2vz_inputs"
SCENE_CACHE_FOLDER = "scene_cache"


def _scene_control() -> Any | None:
    """The optional scene-control module (issue 4), or None when it is not there."""
    try:
        return importlib.import_module(f"{__package__}.{SCENE_CONTROL_MODULE}")
    except ImportError:
        return None


def _needs_active_strip(settings: Any) -> bool:
    if settings.mode == "pix2pix":
        return True
    if settings.mode == "controlnet":
        return any(c.source == "ACTIVE_STRIP" for c in settings.enabled_controlnets())
    return False


def has_source_strip(settings: Any) -> bool:
    """True when a strip sets the job's frames: pix2pix, or a strip-driven ControlNet."""
    if settings.mode == "pix2pix":
        return True
    if settings.mode == "controlnet":
        return any(c.source != "SCENE" for c in settings.enabled_controlnets())
    return False


def job_frames(scene: Any, settings: Any) -> tuple[int, int]:
    """(first scene frame, frame count) of a job no source strip places: from the current
    frame, or the scene's or the preview range (Frame Range)."""
    if settings.frame_range == "CURRENT":
        return scene.frame_current, settings.frames
    if settings.frame_range == "PREVIEW" and scene.use_preview_range:
        first, last = scene.frame_preview_start, scene.frame_preview_end
    else:
        first, last = scene.frame_start, scene.frame_end
    return first, max(1, last - first + 1)


def frames_text(context: Any) -> str:
    """Which scene frames a job without a source strip renders, for the panel: "renders
    scene frames 40-47" (scene-driven ControlNets) or "frames 40-47" (text to video);
    empty when a source strip sets them."""
    settings = context.scene.t2vz
    if has_source_strip(settings):
        return ""
    first, count = job_frames(context.scene, settings)
    if settings.mode == "controlnet":
        module = _scene_control()
        entries = [c for c in settings.enabled_controlnets() if c.source == "SCENE"]
        if module is not None and entries and hasattr(module, "scene_frames"):
            frames = module.scene_frames(context, entries[0], first, count)
            return f"Renders scene frames {frames[0]}-{frames[-1]}"
        return f"Renders scene frames {first}-{first + count - 1}"
    return f"Frames {first}-{first + count - 1}"


def panel_frame_count(context: Any) -> int:
    """How many frames the panel's job makes: the source strip's when it sets them."""
    scene, settings = context.scene, context.scene.t2vz
    if not has_source_strip(settings):
        return job_frames(scene, settings)[1]
    strip = strips.source_strip(scene)
    if settings.match_source and strips.is_video_strip(strip):
        return int(strip.frame_final_duration)
    return settings.frames


def panel_estimate(context: Any) -> tuple[float | None, str]:
    """Seconds the panel's job should take and what the figure rests on (see
    runtime.estimate_job)."""
    settings = context.scene.t2vz
    prefs = preferences.get_prefs(context)
    default = prefs.pix2pix_model if settings.mode == "pix2pix" else prefs.model
    width, height = settings.size(context.scene)
    return runtime.estimate_job(
        panel_frame_count(context),
        settings.steps,
        width,
        height,
        settings.model.strip() or default.strip(),
        prefs.device,
    )


def regenerate_estimate(context: Any, strip: Any) -> tuple[float | None, str]:
    """Seconds Regenerate on ``strip`` should take: its job's frames and size, the panel's
    steps (and frames and model where Regenerate takes them from the panel)."""
    stored = strips.stored_job(strip) or {}
    settings = context.scene.t2vz
    frames = int(stored.get("frames") or settings.frames)
    if stored.get("mode", "text2video") == "text2video":
        frames = settings.frames
    model = settings.model.strip() or str(stored.get("model") or "")
    try:
        width, height = int(stored["width"]), int(stored["height"])
    except (KeyError, TypeError, ValueError):
        width, height = settings.size(context.scene)
    prefs = preferences.get_prefs(context)
    return runtime.estimate_job(frames, settings.steps, width, height, model, prefs.device)


def invoke_confirm(context: Any, operator: Any, event: Any, message: str) -> set[str]:
    """Ask ``message`` before ``operator`` runs (Blender 4.1+ shows the text; older ones
    only an OK button)."""
    wm = context.window_manager
    params = wm.bl_rna.functions["invoke_confirm"].parameters.keys()
    kwargs: dict[str, str] = {}
    if "message" in params:
        kwargs = {"title": "A Long Job", "message": message, "confirm_text": "Start"}
    return wm.invoke_confirm(operator, event, **kwargs)


def past_end_text(scene: Any, start: int, frames: int) -> str:
    """A warning when a result starting at ``start`` runs past the scene's end; else ""."""
    last = start + frames - 1
    if last <= scene.frame_end:
        return ""
    return f"Ends at frame {last}, past the scene's end ({scene.frame_end})"


# Pix2pix on a result strip: edit the result itself, or the strip it was made from.
USE_SOURCE_ITEMS = [
    ("ASK", "Ask", "Ask when the input is a generated strip with a source"),
    ("RESULT", "This Strip", "Edit the generated strip itself"),
    ("SOURCE", "Its Source", "Edit the strip the generated strip was made from"),
]


def result_source(scene: Any, strip: Any) -> Any | None:
    """The strip a generated strip was made from, when it is still in the scene."""
    name = strip.get(strips.SOURCE_PROPERTY) if strip is not None else None
    if not isinstance(name, str) or not name or strips.stored_job(strip) is None:
        return None
    editor = scene.sequence_editor
    return strips.every_strip(editor).get(name) if editor is not None else None


def _output_root(settings: Any) -> Path:
    return jobs.resolve_output_root(settings.output_dir, bpy.data.filepath)


def _fps(scene: Any) -> float:
    return scene.render.fps / scene.render.fps_base


def check_detector(
    index: int, detector: str, python: Any, allow_pickle: bool | None = None
) -> None:
    """Refuse a detector whose packages the backend environment lacks, saying how to get them,
    or one that loads pickled weights while they are not allowed (``allow_pickle`` None: the
    preference)."""
    missing = capabilities.missing_modules(detector, python)
    if missing:
        raise jobs.JobBuildError(
            f"ControlNet {index + 1}: detector {detector!r} needs {', '.join(missing)} in the "
            f"backend environment. {capabilities.INSTALL_HINT}"
        )
    if allow_pickle is None:
        allow_pickle = bool(getattr(preferences.get_prefs(), "allow_pickle", False))
    if detector in capabilities.pickled_detectors() and not allow_pickle:
        raise jobs.JobBuildError(
            f"ControlNet {index + 1}: detector {detector!r} {capabilities.PICKLE_HINT}"
        )


def detector_preview_request(context: Any) -> dict[str, Any]:
    """The preview_detector request of the selected ControlNet at the current frame: its
    strip's frames as a job reads them, its detector, the job's size and fit."""
    scene = context.scene
    settings = scene.t2vz
    index = settings.controlnet_index
    if not 0 <= index < len(settings.controlnets):
        raise ValueError("select a ControlNet first")
    item = settings.controlnets[index]
    if item.source == "SCENE":
        raise ValueError("a scene pass needs no detector: use Preview Control")
    if item.detector == "none":
        raise ValueError("the detector is None: the strip is used as it is")
    if item.source == "ACTIVE_STRIP":
        strip = strips.source_strip(scene)
    else:
        editor = scene.sequence_editor
        strip = strips.every_strip(editor).get(item.strip_name) if editor else None
        if strip is None:
            raise strips.StripInputError(f"strip {item.strip_name!r} not found")
    staging = Path(tempfile.gettempdir()) / "t2vz-detector-preview"  # image sequences
    runtime.remove_tree(staging)
    control, count = strips.video_input(strip, staging)
    frame = scene.frame_current - int(strip.frame_final_start)
    if not 0 <= frame < count:
        last = int(strip.frame_final_start) + count - 1
        raise ValueError(
            f"frame {scene.frame_current} is not on strip {strip.name!r} "
            f"(frames {int(strip.frame_final_start)}-{last}): move the playhead onto it"
        )
    width, height = settings.size(scene)
    request = {
        "control": control,
        "detector": item.detector,
        "frame": frame,
        "width": width,
        "height": height,
        "fit": settings.fit,
    }
    protocol = backend_paths.load_protocol()
    if hasattr(protocol, "validate_detector_preview"):
        protocol.validate_detector_preview(request)  # JobError naming the field
    return request


class JobPlan:
    """A job ready to submit, and where its result goes."""

    def __init__(
        self,
        job: dict,
        scene: str,
        above: int,
        start: int,
        staging: Path | None,
        take_group: str = "",
        source: str = "",
        warning: str = "",
    ):
        self.job, self.scene, self.above, self.start, self.staging = (
            job,
            scene,
            above,
            start,
            staging,
        )
        self.take_group, self.source, self.warning = take_group, source, warning


def plan_from_panel(context: Any, input_strip: Any = None) -> JobPlan:
    """The job the panel describes, with inputs read from the sequencer.

    Raises ValueError subclasses (jobs.JobBuildError, strips.StripInputError, the
    protocol's JobError) with a message naming the bad value.
    """
    settings = context.scene.t2vz
    root = _output_root(settings)
    out = jobs.unique_out_dir(root, settings.prompt, settings.seed, runtime.RUNNER.outputs())
    staging = root / INPUTS_FOLDER / out.name
    try:
        return _plan_from_panel(context, out, staging, input_strip)
    except BaseException:
        remove_staging(staging)
        raise


def remove_staging(staging: Path | None) -> None:
    """Delete a job's staged inputs, and the inputs folder (with an empty pass cache) when
    nothing else is left in it: a failed first job leaves the output folder as it was."""
    if staging is None:
        return
    runtime.remove_tree(staging)
    inputs = staging.parent
    for folder in (inputs / SCENE_CACHE_FOLDER, inputs):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def job_values(settings: Any, scene: Any, prefs: Any) -> dict[str, Any]:
    """The panel's settings as job values, with the preferences' device, precision and
    compile choice."""
    values = settings.to_values(scene, prefs.device, prefs.dtype)
    values["compile"] = bool(getattr(prefs, "compile_unet", False))
    return values


def _plan_from_panel(context: Any, out: Path, staging: Path, input_strip: Any) -> JobPlan:
    scene = context.scene
    settings = scene.t2vz
    prefs = preferences.get_prefs(context)
    values = job_values(settings, scene, prefs)
    if has_source_strip(settings):
        first, count = scene.frame_current, settings.frames
    else:
        first, count = job_frames(scene, settings)
    values["frames"] = count
    editor = scene.sequence_editor
    active = input_strip if input_strip is not None else strips.source_strip(scene)
    source = None
    video = None
    source_frames = None
    controls: list[dict | None] = []
    masks = None  # foreground masks rendered from the scene, for background smoothing
    flow_source = None  # the scene's motion vectors (consistency "flow"); None: estimate

    if settings.mode == "pix2pix":
        video, source_frames = strips.video_input(active, staging / "video")
        source = active
    elif settings.mode == "controlnet":
        entries = settings.enabled_controlnets()
        for i, item in enumerate(entries):
            if item.source == "SCENE":
                controls.append(None)  # rendered below, once the frame count is known
                continue
            if item.source == "ACTIVE_STRIP":
                strip = active
            elif not item.strip_name.strip():
                raise strips.StripInputError(f"ControlNet {i + 1}: pick a strip for its Source")
            else:
                strip = strips.every_strip(editor).get(item.strip_name) if editor else None
                if strip is None:
                    raise strips.StripInputError(
                        f"ControlNet {i + 1}: strip {item.strip_name!r} not found"
                    )
            check_detector(i, item.detector, preferences.backend_python(prefs))
            control, n = strips.video_input(strip, staging / f"control_{i + 1}")
            controls.append(control)
            source = source or strip
            source_frames = n if source_frames is None else min(source_frames, n)
        if None in controls:
            frames = count
            if source_frames is not None and settings.match_source:
                frames = source_frames
            source_frames = frames if source_frames is None else source_frames
            start = source.frame_final_start if source else first
            width, height = values["width"], values["height"]
            module = _scene_control()
            first_scene_item = next(item for item in entries if item.source == "SCENE")
            if values.get("consistency") == "flow" and hasattr(module, "render_flow"):
                # Blender's exact motion vectors instead of estimating them; rendered first,
                # with the Z pass, so the depth and mask controls reuse those renders.
                flow_source = module.render_flow(
                    context, first_scene_item, start, frames, width, height, staging / "flow"
                )
            for i, item in enumerate(entries):
                if controls[i] is not None:
                    continue
                if module is None or not hasattr(module, "render_control"):
                    raise jobs.JobBuildError(
                        f"ControlNet {i + 1}: control from the 3D scene is not available"
                    )
                folder = staging / f"control_{i + 1}"
                controls[i] = module.render_control(
                    context, item, start, frames, width, height, folder
                )
            if values.get("smooth_bg") and hasattr(module, "render_masks"):
                masks = module.render_masks(
                    context, first_scene_item, start, frames, width, height, staging / "masks"
                )

    job = jobs.build_job(
        values,
        out=out,
        fps=_fps(scene),
        defaults=preferences.model_defaults(prefs),
        source_frames=source_frames,
        video=video,
        controls=[c for c in controls if c is not None],
        flow_source=flow_source,
    )
    if masks is not None:
        job = jobs.validate({**job, "masks": masks})
    if source is not None:
        above, start = source.channel, source.frame_final_start
    else:
        above, start = 0, first
    return JobPlan(
        job,
        scene.name,
        above,
        start,
        staging if staging.exists() else None,
        source=source.name if source is not None else "",
        warning=past_end_text(scene, start, job["frames"]),
    )


# Regenerate's seed: the panel's, the strip's own (the same take again with the panel's
# other changes), or a new random one (also put in the panel).
SEED_ITEMS = [
    ("PANEL", "Panel's Seed", "The seed in the panel"),
    ("KEEP", "Same Seed", "The seed the strip was made with"),
    ("NEW", "New Seed", "A new random seed (also set in the panel)"),
]


def plan_regenerate(context: Any, strip: Any, seed: str = "PANEL") -> JobPlan:
    """A result strip's job with the panel's changes, placed above that strip."""
    stored = strips.stored_job(strip)
    if stored is None:
        raise jobs.JobBuildError(f"strip {strip.name!r} was not made by Text2Video-Zero")
    stored = strips.absolute_inputs(strip, stored)  # stored relative to the .blend
    scene = context.scene
    settings = scene.t2vz
    prefs = preferences.get_prefs(context)
    values = job_values(settings, scene, prefs)
    if seed == "KEEP":
        values["seed"] = int(stored.get("seed", values["seed"]))
    elif seed == "NEW":
        values["seed"] = settings.randomize_seed()
    out = jobs.unique_out_dir(
        _output_root(settings), settings.prompt, values["seed"], runtime.RUNNER.outputs()
    )
    job = jobs.rebuild_job(stored, values, out=out, defaults=preferences.model_defaults(prefs))
    group = strips.take_of(strip)[0]
    if not group:  # a result made before takes: it becomes take 1 of its own group
        group = uuid.uuid4().hex[:12]
        strips.mark_take(strip, group, 1)
    source = strip.get(strips.SOURCE_PROPERTY)
    return JobPlan(
        job,
        scene.name,
        strip.channel,
        strip.frame_final_start,
        None,
        take_group=group,
        source=source if isinstance(source, str) else "",
        warning=past_end_text(scene, strip.frame_final_start, job["frames"]),
    )


def submit_plan(operator: Any, context: Any, plan: JobPlan) -> set[str]:
    """Start ``plan`` on the worker, or queue it behind the job in flight; report problems
    on ``operator``."""
    prefs = preferences.get_prefs(context)
    queued = runtime.RUNNER.busy
    try:
        python = preferences.resolve_python(prefs)
        operator.job_id = runtime.RUNNER.submit(
            plan.job,
            scene=plan.scene,
            above=plan.above,
            start=plan.start,
            name=jobs.strip_name(plan.job["prompt"]),
            python=python,
            env=preferences.worker_env(prefs),
            staging=plan.staging,
            allow_pickle=bool(getattr(prefs, "allow_pickle", False)),
            take_group=plan.take_group,
            source=plan.source,
            queue=True,
        )
    except preferences.EnvironmentMissingError as exc:
        remove_staging(plan.staging)
        operator.report({"ERROR"}, str(exc))
        return {"CANCELLED"}
    except (WorkerError, runtime.RunnerBusyError, backend_paths.BackendNotFoundError) as exc:
        remove_staging(plan.staging)
        operator.report({"ERROR"}, f"Could not start the job: {exc}")
        return {"CANCELLED"}
    if plan.warning:
        operator.report({"WARNING"}, plan.warning)
    if queued:
        place = len(runtime.RUNNER.queue)
        operator.report({"INFO"}, f"Queued {plan.job['frames']} frames (number {place} in line)")
    else:
        operator.report({"INFO"}, f"Generating {plan.job['frames']} frames into {plan.job['out']}")
    return {"FINISHED"}


class _JobOperator:
    """Shared invoke/modal: watch for ESC while the job runs, report how it ended."""

    _timer = None
    _job_id = ""
    job_id = ""  # the id submit_plan gave the job (running or queued)

    def plan(self, context: Any) -> JobPlan:
        raise NotImplementedError

    def long_job_question(self, context: Any) -> str:
        """The question a very long job asks before it starts (runtime.confirm_text)."""
        return ""

    def execute(self, context: Any) -> set[str]:
        try:
            preferences.resolve_python(preferences.get_prefs(context))
            plan = self.plan(context)
        except preferences.EnvironmentMissingError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        except (ValueError, OSError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return submit_plan(self, context, plan)

    def invoke(self, context: Any, event: Any) -> set[str]:
        question = self.long_job_question(context) if context.window is not None else ""
        if question:
            return invoke_confirm(context, self, event, question)  # then execute
        result = self.execute(context)
        if "FINISHED" not in result or context.window is None:
            return result
        self._job_id = self.job_id
        self._timer = context.window_manager.event_timer_add(0.25, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context: Any, event: Any) -> set[str]:
        """ESC cancels; the operator ends when its job has ended."""
        job = runtime.RUNNER.job
        if event.type == "ESC" and event.value == "PRESS" and job and job.id == self._job_id:
            if runtime.RUNNER.cancel():
                self.report({"INFO"}, "Cancelling...")
            return {"RUNNING_MODAL"}
        job = runtime.RUNNER.job
        waiting = any(q.id == self._job_id for q in runtime.RUNNER.queue)
        if not waiting and (job is None or job.id != self._job_id):
            if self._timer is not None:
                context.window_manager.event_timer_remove(self._timer)
                self._timer = None
            outcome = runtime.RUNNER.outcome
            if outcome is not None and outcome.job_id == self._job_id:
                self.report({outcome.level}, outcome.message)
            return {"FINISHED"}
        return {"PASS_THROUGH"}


def _input_problem(context: Any) -> str:
    """Why Generate cannot run with the panel's mode and the selection; "" when it can."""
    settings = context.scene.t2vz
    if _needs_active_strip(settings) and not strips.is_video_strip(
        strips.source_strip(context.scene)
    ):
        return "Make a movie or image strip active: it is the job's input"
    if settings.mode == "controlnet" and not settings.enabled_controlnets():
        return "Add a ControlNet first"
    return controlnet_family_problem(context)


def controlnet_model(context: Any, values: dict[str, Any], index: int = 0) -> str | None:
    """The model a ControlNet entry (its ``to_values()``) will use: its own, else the
    preferences' for its kind or the base model family's default
    (``jobs.resolve_controlnet``); None when there is none."""
    settings = context.scene.t2vz
    defaults = preferences.model_defaults(preferences.get_prefs(context))
    family = model_families.model_family(settings.size_model())
    return jobs.resolve_controlnet(values, defaults, index, family)


def controlnet_family_problem(context: Any) -> str:
    """Why the panel's ControlNets cannot run on its base model: the first of another
    family, naming both models and families; "" outside ControlNet mode or when none is."""
    settings = context.scene.t2vz
    if settings.mode != "controlnet":
        return ""
    models = [
        controlnet_model(context, item.to_values(), i)
        for i, item in enumerate(settings.enabled_controlnets())
    ]
    return jobs.family_problem(settings.size_model(), models)


def source_question(context: Any) -> str:
    """The question Generate asks before pix2pix edits a generated strip that has a source
    strip of its own; "" when there is nothing to ask."""
    settings = context.scene.t2vz
    if settings.mode != "pix2pix":
        return ""
    strip = strips.source_strip(context.scene)
    source = result_source(context.scene, strip)
    if source is None:
        return ""
    return f"{strip.name!r} is a generated strip: edit it, or its source {source.name!r}?"


class T2VZ_OT_generate(_JobOperator, bpy.types.Operator):
    """Generate a clip from the panel's settings in the background (ESC cancels); while a
    job runs, the new one waits in the queue"""

    bl_idname = "t2vz.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    use_source: EnumProperty(
        name="Input",
        items=USE_SOURCE_ITEMS,
        default="ASK",
        options={"SKIP_SAVE"},
        description="Pix2pix on a generated strip: edit it, or the strip it was made from",
    )

    @classmethod
    def poll(cls, context: Any) -> bool:
        if context.scene is None:
            cls.poll_message_set("No scene")
            return False
        problem = _input_problem(context)
        if problem:
            cls.poll_message_set(problem)
            return False
        return True

    def invoke(self, context: Any, event: Any) -> set[str]:
        if self.use_source == "ASK" and source_question(context) and context.window:
            self.use_source = "SOURCE"
            return context.window_manager.invoke_props_dialog(self, width=420)
        return super().invoke(context, event)

    def draw(self, context: Any) -> None:
        layout = self.layout
        for line in textwrap.wrap(source_question(context), 60, break_long_words=False):
            layout.label(text=line)
        layout.prop(self, "use_source", expand=True)
        estimate = runtime.estimate_text(*panel_estimate(context))
        if estimate:
            layout.label(text=estimate, icon="SORTTIME")

    def long_job_question(self, context: Any) -> str:
        return runtime.confirm_text(*panel_estimate(context))

    def plan(self, context: Any) -> JobPlan:
        strip = None
        if self.use_source == "SOURCE" and context.scene.t2vz.mode == "pix2pix":
            strip = result_source(context.scene, strips.source_strip(context.scene))
        return plan_from_panel(context, strip)


class T2VZ_OT_generate_batch(bpy.types.Operator):
    """Generate one clip for each selected movie or image strip, queued one after another"""

    bl_idname = "t2vz.generate_batch"
    bl_label = "Generate for Selected"
    bl_options = {"REGISTER"}

    job_id = ""

    @classmethod
    def poll(cls, context: Any) -> bool:
        if context.scene is None or not _needs_active_strip(context.scene.t2vz):
            cls.poll_message_set("Batch works in modes that read a strip (pix2pix, ControlNet)")
            return False
        if len(batch_strips(context.scene)) < 1:
            cls.poll_message_set("Select movie or image strips first")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        try:
            preferences.resolve_python(preferences.get_prefs(context))
        except preferences.EnvironmentMissingError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        done, failed = 0, []
        for strip in batch_strips(context.scene):
            try:
                plan = plan_from_panel(context, strip)
            except (ValueError, OSError) as exc:
                failed.append(f"{strip.name}: {exc}")
                continue
            if "FINISHED" in submit_plan(self, context, plan):
                done += 1
        for line in failed:
            self.report({"WARNING"}, line)
        if not done:
            self.report({"ERROR"}, "No job started" + (f": {failed[0]}" if failed else ""))
            return {"CANCELLED"}
        self.report({"INFO"}, f"{done} jobs started or queued")
        return {"FINISHED"}


def batch_strips(scene: Any) -> list[Any]:
    """The selected movie and image strips that are not generated results, by channel and
    start (the order their jobs queue in)."""
    editor = scene.sequence_editor
    if editor is None:
        return []
    found = [
        s
        for s in strips.top_strips(editor)
        if s.select and strips.is_video_strip(s) and strips.stored_job(s) is None
    ]
    return sorted(found, key=lambda s: (s.frame_final_start, s.channel))


def regenerate_problem(context: Any) -> str:
    """Why Regenerate cannot run; "" when it can."""
    strip = strips.source_strip(context.scene)
    if strip is None or strips.stored_job(strip) is None:
        return "Select a generated strip (one made by Generate)"
    return ""


class T2VZ_OT_regenerate(_JobOperator, bpy.types.Operator):
    """Run the selected generated strip's job again with the panel's changes: a new take at
    the same place, muting the earlier ones"""

    bl_idname = "t2vz.regenerate"
    bl_label = "Regenerate"
    bl_options = {"REGISTER"}

    seed: EnumProperty(name="Seed", items=SEED_ITEMS, default="PANEL", options={"SKIP_SAVE"})

    @classmethod
    def description(cls, context: Any, properties: Any) -> str:
        seed = getattr(properties, "seed", "PANEL")
        if seed == "KEEP":
            return "A new take with the panel's changes and the strip's own seed"
        if seed == "NEW":
            return "A new take with the panel's changes and a new random seed"
        return "A new take with the panel's changes (and its seed)"

    @classmethod
    def poll(cls, context: Any) -> bool:
        if context.scene is None:
            cls.poll_message_set("No scene")
            return False
        problem = regenerate_problem(context)
        if problem:
            cls.poll_message_set(problem)
            return False
        return True

    def plan(self, context: Any) -> JobPlan:
        return plan_regenerate(context, strips.source_strip(context.scene), self.seed)

    def long_job_question(self, context: Any) -> str:
        strip = strips.source_strip(context.scene)
        return runtime.confirm_text(*regenerate_estimate(context, strip))


class T2VZ_OT_queue_remove(bpy.types.Operator):
    """Take this job out of the queue (it never starts)"""

    bl_idname = "t2vz.queue_remove"
    bl_label = "Remove Queued Job"
    bl_options = {"REGISTER", "INTERNAL"}

    job_id: StringProperty(name="Job")

    def execute(self, context: Any) -> set[str]:
        if not runtime.RUNNER.cancel_queued(self.job_id):
            self.report({"ERROR"}, f"No queued job {self.job_id!r}")
            return {"CANCELLED"}
        return {"FINISHED"}


class T2VZ_OT_take_show(bpy.types.Operator):
    """Show this take: unmute it and mute the other takes at its place"""

    bl_idname = "t2vz.take_show"
    bl_label = "Show Take"
    bl_options = {"REGISTER", "UNDO", "INTERNAL"}

    strip_name: StringProperty(name="Strip")

    def execute(self, context: Any) -> set[str]:
        editor = context.scene.sequence_editor
        strip = strips.every_strip(editor).get(self.strip_name) if editor else None
        if strip is None or not strips.take_of(strip)[0]:
            self.report({"ERROR"}, f"No take named {self.strip_name!r}")
            return {"CANCELLED"}
        strips.mute_other_takes(editor, strip)
        strips.select_only(editor, strip)
        return {"FINISHED"}


# Scene passes the add-on can show as a picture (OpenPose drawn as the backend draws it).
PREVIEW_PASSES = {"DEPTH", "CANNY", "OPENPOSE"}


def preview_problem(context: Any) -> str:
    """Why the active ControlNet's pass cannot be previewed; "" when it can."""
    settings = context.scene.t2vz
    if settings.mode != "controlnet" or not 0 <= settings.controlnet_index < len(
        settings.controlnets
    ):
        return "Pick a ControlNet entry first"
    item = settings.controlnets[settings.controlnet_index]
    if item.source != "SCENE":
        return "Previews show passes rendered from the 3D scene"
    if item.scene_pass not in PREVIEW_PASSES:
        return f"No preview of the {item.scene_pass.title()} pass"
    if _scene_control() is None:
        return "Scene control is not installed"
    return ""


def render_preview(context: Any) -> Path:
    """Render the active ControlNet's scene pass at the current frame; the picture's path.

    It goes under the output folder's staging area (``<output>/.t2vz_inputs/preview``),
    sharing the scene passes' cache, and replaces the previous preview.
    """
    problem = preview_problem(context)
    if problem:
        raise jobs.JobBuildError(problem)
    scene = context.scene
    settings = scene.t2vz
    item = settings.controlnets[settings.controlnet_index]
    folder = _output_root(settings) / INPUTS_FOLDER / "preview" / "control"
    runtime.remove_tree(folder)
    width, height = settings.size(scene)
    control = _scene_control().render_control(
        context, item, scene.frame_current, 1, width, height, folder
    )
    path = Path(control["path"])
    if path.suffix.lower() == ".json":  # OpenPose keypoints: drawn here as the backend would
        return _scene_control().pose_preview(path, width, height, folder / "pose.png")
    pictures = sorted(path.glob("frame_*.png")) if path.is_dir() else [path]
    if not pictures:
        raise jobs.JobBuildError(f"the pass wrote no picture into {path}")
    return pictures[0]


class T2VZ_OT_control_preview(bpy.types.Operator):
    """Render the selected ControlNet's pass at the current frame and show it in the panel,
    before spending a generation on it"""

    bl_idname = "t2vz.control_preview"
    bl_label = "Preview Control"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        problem = preview_problem(context) if context.scene is not None else "No scene"
        if problem:
            cls.poll_message_set(problem)
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        try:
            path = render_preview(context)
        except (ValueError, OSError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        runtime.RUNNER.show_preview(str(path))
        self.report({"INFO"}, f"Control at frame {context.scene.frame_current}: {path}")
        return {"FINISHED"}


class T2VZ_OT_detector_preview(bpy.types.Operator):
    """Run the selected ControlNet's detector on its strip at the current frame in the
    backend and show the control image in the panel, before a generation is spent"""

    bl_idname = "t2vz.detector_preview"
    bl_label = "Preview Detector"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        settings = context.scene.t2vz if context.scene is not None else None
        if settings is None or not 0 <= settings.controlnet_index < len(settings.controlnets):
            cls.poll_message_set("Select a ControlNet")
            return False
        item = settings.controlnets[settings.controlnet_index]
        if item.source == "SCENE" or item.detector == "none":
            cls.poll_message_set("Pick a strip source and a detector")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        settings = context.scene.t2vz
        item = settings.controlnets[settings.controlnet_index]
        prefs = preferences.get_prefs(context)
        try:
            python = preferences.resolve_python(prefs)
            check_detector(settings.controlnet_index, item.detector, python, prefs.allow_pickle)
            request = detector_preview_request(context)
            runtime.RUNNER.preview_detector(
                request,
                python=python,
                env=preferences.worker_env(prefs),
                allow_pickle=bool(prefs.allow_pickle),
            )
        except (ValueError, OSError, preferences.EnvironmentMissingError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        except (WorkerError, backend_paths.BackendNotFoundError) as exc:
            self.report({"ERROR"}, f"Could not ask the backend: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Running the {item.detector} detector on frame "
                    f"{context.scene.frame_current}...")  # fmt: skip
        return {"FINISHED"}


class T2VZ_OT_cancel(bpy.types.Operator):
    """Stop the running job after its current denoising step"""

    bl_idname = "t2vz.cancel"
    bl_label = "Cancel"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        if not runtime.RUNNER.busy:
            cls.poll_message_set("No job is running")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        runtime.RUNNER.cancel()
        self.report({"INFO"}, "Cancelling...")
        return {"FINISHED"}


class T2VZ_OT_randomize_seed(bpy.types.Operator):
    """Pick a random seed"""

    bl_idname = "t2vz.randomize_seed"
    bl_label = "Randomize Seed"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context: Any) -> set[str]:
        context.scene.t2vz.randomize_seed()
        return {"FINISHED"}


class T2VZ_OT_controlnet_add(bpy.types.Operator):
    """Add a ControlNet to the job"""

    bl_idname = "t2vz.controlnet_add"
    bl_label = "Add ControlNet"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context: Any) -> set[str]:
        settings = context.scene.t2vz
        settings.controlnets.add()
        settings.controlnet_index = len(settings.controlnets) - 1
        return {"FINISHED"}


class T2VZ_OT_controlnet_remove(bpy.types.Operator):
    """Remove the selected ControlNet"""

    bl_idname = "t2vz.controlnet_remove"
    bl_label = "Remove ControlNet"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(default=-1, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context: Any) -> bool:
        if context.scene is None or not len(context.scene.t2vz.controlnets):
            cls.poll_message_set("There is no ControlNet to remove")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        settings = context.scene.t2vz
        index = self.index if self.index >= 0 else settings.controlnet_index
        if not 0 <= index < len(settings.controlnets):
            self.report({"ERROR"}, f"No ControlNet at index {index}")
            return {"CANCELLED"}
        settings.controlnets.remove(index)
        settings.controlnet_index = max(0, min(index, len(settings.controlnets) - 1))
        return {"FINISHED"}


class T2VZ_OT_controlnet_use(bpy.types.Operator):
    """Use this model for the selected ControlNet"""

    bl_idname = "t2vz.controlnet_use"
    bl_label = "Use ControlNet Model"
    bl_options = {"REGISTER", "UNDO"}

    model: StringProperty(name="Model", options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context: Any) -> bool:
        settings = getattr(context.scene, "t2vz", None)
        if settings is None or not 0 <= settings.controlnet_index < len(settings.controlnets):
            cls.poll_message_set("Select a ControlNet")
            return False
        return True

    @classmethod
    def description(cls, context: Any, properties: Any) -> str:
        if not properties.model:
            return "Clear the Model: the default ControlNet for the entry's kind"
        return f"Use {properties.model} for the selected ControlNet"

    def execute(self, context: Any) -> set[str]:
        settings = context.scene.t2vz
        settings.controlnets[settings.controlnet_index].model = self.model.strip()
        return {"FINISHED"}


class T2VZ_OT_adapter_add(bpy.types.Operator):
    """Add a LoRA or a textual inversion embedding to the job"""

    bl_idname = "t2vz.adapter_add"
    bl_label = "Add LoRA or Embedding"
    bl_options = {"REGISTER", "UNDO"}

    kind: EnumProperty(name="Kind", items=ADAPTER_KIND_ITEMS, default="LORA")

    def execute(self, context: Any) -> set[str]:
        settings = context.scene.t2vz
        item = settings.adapters.add()
        item.kind = self.kind
        settings.adapter_index = len(settings.adapters) - 1
        return {"FINISHED"}


class T2VZ_OT_adapter_remove(bpy.types.Operator):
    """Remove the selected LoRA or embedding"""

    bl_idname = "t2vz.adapter_remove"
    bl_label = "Remove LoRA or Embedding"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        if context.scene is None or not len(context.scene.t2vz.adapters):
            cls.poll_message_set("There is no LoRA or embedding to remove")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        settings = context.scene.t2vz
        index = settings.adapter_index
        if not 0 <= index < len(settings.adapters):
            self.report({"ERROR"}, f"No LoRA or embedding at index {index}")
            return {"CANCELLED"}
        settings.adapters.remove(index)
        settings.adapter_index = max(0, min(index, len(settings.adapters) - 1))
        return {"FINISHED"}


def load_adapters(settings: Any, job: dict) -> None:
    """Fill the panel's LoRA and embedding list from a job's ``loras`` and ``embeddings``."""
    settings.adapters.clear()
    for lora in job.get("loras") or ():
        item = settings.adapters.add()
        item.kind, item.path, item.weight = "LORA", lora["path"], lora.get("weight", 1.0)
    for embedding in job.get("embeddings") or ():
        item = settings.adapters.add()
        item.kind, item.path, item.token = "EMBEDDING", embedding["path"], embedding["token"]
    settings.adapter_index = 0


class T2VZ_OT_load_settings(bpy.types.Operator):
    """Copy the selected generated strip's settings into the panel"""

    bl_idname = "t2vz.load_settings"
    bl_label = "Load Settings From Strip"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        if context.scene is None or strips.stored_job(strips.source_strip(context.scene)) is None:
            cls.poll_message_set("Select a generated strip (one made by Generate)")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        job = strips.stored_job(strips.source_strip(context.scene))
        settings = context.scene.t2vz
        for name in ("prompt", "negative_prompt", "seed", "steps", "guidance", "image_guidance"):
            if name in job:
                setattr(settings, name, job[name])
        for name in ("chunk_size", "smooth_bg", "smooth_alpha", "write_mp4", "fit"):
            if name in job:
                setattr(settings, name, job[name])
        settings.mode = job.get("mode", settings.mode)
        settings.model = job.get("model", "")
        if job.get("motion"):
            settings.motion = job["motion"]
        settings.frames = job.get("frames", settings.frames)
        load_adapters(settings, job)
        if (job.get("width"), job.get("height")) != settings.size(context.scene):
            settings.size_mode = "CUSTOM"
            settings.width, settings.height = job["width"], job["height"]
        self.report({"INFO"}, f"Loaded: {json.dumps(job.get('prompt', ''))}")
        return {"FINISHED"}


class T2VZ_OT_restart_worker(bpy.types.Operator):
    """Stop the backend worker; the next job starts a fresh one (frees its memory)"""

    bl_idname = "t2vz.restart_worker"
    bl_label = "Stop Backend Worker"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        if runtime.RUNNER.busy:
            cls.poll_message_set("A job is running: cancel it first")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        runtime.RUNNER.stop_worker()
        context.window_manager.t2vz_status.message = "Backend worker stopped"
        return {"FINISHED"}


class T2VZ_OT_install_backend(bpy.types.Operator):
    """Create the backend environment (PyTorch, diffusers...) in the background"""

    bl_idname = "t2vz.install_backend"
    bl_label = "Install Backend"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        if runtime.INSTALLER.running:
            cls.poll_message_set("The installer is already running")
            return False
        if not preferences.online_access():
            cls.poll_message_set(preferences.OFFLINE_INSTALL)
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        prefs = preferences.get_prefs(context)
        try:
            venv = preferences.venv_dir()
            runtime.INSTALLER.start(
                venv,
                torch=prefs.torch_variant,
                detectors=prefs.install_detectors,
                cluster=prefs.install_cluster,
            )
        except (
            OSError,
            WorkerError,
            runtime.RunnerBusyError,
            backend_paths.BackendNotFoundError,
        ) as exc:
            self.report({"ERROR"}, f"Could not start the installer: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Installing the backend into {venv} (progress in the preferences)")
        return {"FINISHED"}


class T2VZ_OT_install_cancel(bpy.types.Operator):
    """Stop the running installer"""

    bl_idname = "t2vz.install_cancel"
    bl_label = "Stop Install"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        if not runtime.INSTALLER.running:
            cls.poll_message_set("The installer is not running")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        runtime.INSTALLER.cancel()
        return {"FINISHED"}


def _cache_request(operator: Any, context: Any, send: Any) -> set[str]:
    """Send a model-cache request to the worker (started if needed); report failures."""
    prefs = preferences.get_prefs(context)
    try:
        python = preferences.resolve_python(prefs)
        send(python=python, env=preferences.worker_env(prefs))
    except preferences.EnvironmentMissingError as exc:
        operator.report({"ERROR"}, str(exc))
        return {"CANCELLED"}
    except (WorkerError, runtime.RunnerBusyError, backend_paths.BackendNotFoundError) as exc:
        operator.report({"ERROR"}, f"Could not ask the backend: {exc}")
        return {"CANCELLED"}
    return {"FINISHED"}


# What the download button fetches: the protocol's fetch_model kinds (FETCH_KINDS).
FETCH_KIND_ITEMS = [
    ("model", "Model", "A base model: what the model loaders read"),
    ("controlnet", "ControlNet", "A ControlNet: what the model loaders read"),
    ("lora", "LoRA", "A LoRA: its one weight file"),
    ("embedding", "Embedding", "A textual inversion embedding: its one weight file"),
]


class T2VZ_OT_model_download(_JobOperator, bpy.types.Operator):
    """Download this from the Hugging Face Hub now, ahead of the first job (ESC cancels)"""

    bl_idname = "t2vz.model_download"
    bl_label = "Download"
    bl_options = {"REGISTER", "INTERNAL"}

    model: StringProperty(
        name="Hub Id", description="owner/name, or owner/name/path/file.safetensors for one file"
    )
    kind: EnumProperty(name="Kind", items=FETCH_KIND_ITEMS, default="model")

    @classmethod
    def poll(cls, context: Any) -> bool:
        if not preferences.online_access():
            cls.poll_message_set(
                "Allow Online Access is off (Preferences > System > Network): nothing downloads"
            )
            return False
        if runtime.RUNNER.busy:
            cls.poll_message_set("A job or download is running: wait or cancel it")
            return False
        return True

    def execute(self, context: Any) -> set[str]:
        if not preferences.is_hub_id(self.model):
            self.report(
                {"ERROR"},
                f"{self.model!r} is not a hub id (owner/name, or owner/name/path/file."
                "safetensors for one file of a repo)",
            )
            return {"CANCELLED"}
        allow_pickle = bool(preferences.get_prefs(context).allow_pickle)
        result = _cache_request(
            self,
            context,
            lambda **kw: runtime.RUNNER.fetch(
                self.model.strip(), kind=self.kind, allow_pickle=allow_pickle, **kw
            ),
        )
        if "FINISHED" in result:
            self.report({"INFO"}, f"Downloading {self.model.strip()} (ESC cancels)")
        return result


class T2VZ_OT_model_remove(bpy.types.Operator):
    """Delete this model from the backend's model cache (it downloads again when needed)"""

    bl_idname = "t2vz.model_remove"
    bl_label = "Remove Downloaded Model"
    bl_options = {"REGISTER", "INTERNAL"}

    model: StringProperty(name="Model")

    @classmethod
    def poll(cls, context: Any) -> bool:
        job = runtime.RUNNER.job
        if job is not None and job.kind == "fetch":
            cls.poll_message_set("A model is downloading: wait or cancel it")
            return False
        return True

    def invoke(self, context: Any, event: Any) -> set[str]:
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context: Any) -> set[str]:
        return _cache_request(
            self, context, lambda **kw: runtime.RUNNER.remove_model(self.model, **kw)
        )


class T2VZ_OT_models_refresh(bpy.types.Operator):
    """List the models in the backend's model cache with their sizes"""

    bl_idname = "t2vz.models_refresh"
    bl_label = "Refresh Downloaded Models"
    bl_options = {"REGISTER", "INTERNAL"}

    def execute(self, context: Any) -> set[str]:
        return _cache_request(self, context, runtime.RUNNER.list_models)


classes = (
    T2VZ_OT_generate,
    T2VZ_OT_generate_batch,
    T2VZ_OT_regenerate,
    T2VZ_OT_queue_remove,
    T2VZ_OT_take_show,
    T2VZ_OT_control_preview,
    T2VZ_OT_detector_preview,
    T2VZ_OT_cancel,
    T2VZ_OT_randomize_seed,
    T2VZ_OT_controlnet_add,
    T2VZ_OT_controlnet_remove,
    T2VZ_OT_controlnet_use,
    T2VZ_OT_adapter_add,
    T2VZ_OT_adapter_remove,
    T2VZ_OT_load_settings,
    T2VZ_OT_restart_worker,
    T2VZ_OT_install_backend,
    T2VZ_OT_install_cancel,
    T2VZ_OT_model_download,
    T2VZ_OT_model_remove,
    T2VZ_OT_models_refresh,
)


# Registers the classes in order and unregisters them in reverse.
register, unregister = bpy.utils.register_classes_factory(classes)
