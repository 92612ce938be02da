"""The sidebar tab in the Video Sequence Editor."""

import os
import textwrap
from typing import Any

import bpy

from . import (
    capabilities,
    model_families,
    operators,
    preferences,
    presets,
    runtime,
    sizing,
    strips,
)
from .properties import DETECTOR_ITEMS

CATEGORY = "T2VZ"


class _SequencerPanel:
    bl_space_type = "SEQUENCE_EDITOR"
    bl_region_type = "UI"
    bl_category = CATEGORY

    @classmethod
    def poll(cls, context: Any) -> bool:
        return context.scene is not None


class T2VZ_UL_controlnets(bpy.types.UIList):
    """The job's ControlNets."""

    def draw_item(
        self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0
    ):  # noqa: D102
        row = layout.row(align=True)
        row.prop(item, "enabled", text="")
        if item.source == "STRIP":
            source = item.strip_name.strip() or "pick a strip"
        else:
            source = item.bl_rna.properties["source"].enum_items[item.source].name
        detail = item.scene_pass.title() if item.source == "SCENE" else item.detector
        icon = "ERROR" if controlnet_mismatch(context, item) else "NONE"
        row.label(text=f"{source} ({detail})", icon=icon)
        row.prop(item, "weight", text="")


class T2VZ_UL_adapters(bpy.types.UIList):
    """The job's LoRAs and textual inversion embeddings."""

    def draw_item(
        self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0
    ):  # noqa: D102
        row = layout.row(align=True)
        row.prop(item, "enabled", text="")
        name = os.path.basename(item.path.rstrip("/\\")) or "(no file)"
        if item.kind == "LORA":
            row.label(text=name, icon="MODIFIER")
            row.prop(item, "weight", text="")
        else:
            row.label(text=f"{item.token or '(no token)'}: {name}", icon="FONT_DATA")


class T2VZ_PT_main(_SequencerPanel, bpy.types.Panel):
    """Prompt, mode, Generate, progress and preview."""

    bl_label = "Text2Video-Zero"
    bl_idname = "T2VZ_PT_main"

    def draw(self, context: Any) -> None:
        layout = self.layout
        settings = context.scene.t2vz
        status = context.window_manager.t2vz_status
        layout.prop(settings, "mode", text="")
        col = layout.column(align=True)
        col.prop(settings, "prompt", text="Prompt", icon="TEXT")
        col.prop(settings, "negative_prompt", text="Negative", icon="REMOVE")
        preferences.draw_hub_field(layout, settings, "model", "model")

        strip = strips.source_strip(context.scene)
        if settings.mode == "pix2pix" or operators._needs_active_strip(settings):
            box = layout.box()
            if strips.is_video_strip(strip):
                box.label(
                    text=f"Source: {strip.name} ({strip.frame_final_duration} frames)",
                    icon="SEQUENCE",
                )
                question = operators.source_question(context)
                if question:
                    box.label(text="A generated strip: Generate asks", icon="QUESTION")
            else:
                box.label(text="Select a movie or image strip", icon="ERROR")
        draw_frames(layout, context)
        draw_wrapped(layout, operators.controlnet_family_problem(context), "ERROR", alert=True)

        busy = runtime.RUNNER.busy
        row = layout.row(align=True)
        row.scale_y = 1.5
        row.operator("t2vz.generate", text="Queue" if busy else "Generate", icon="RENDER_ANIMATION")
        if busy:
            row.operator("t2vz.cancel", text="", icon="CANCEL")
        if (
            operators._needs_active_strip(settings)
            and len(operators.batch_strips(context.scene)) > 1
        ):
            layout.operator("t2vz.generate_batch", icon="SEQ_STRIP_DUPLICATE")
        if strips.stored_job(strip) is not None:
            row = layout.row(align=True)
            row.operator("t2vz.regenerate", text="Same Seed", icon="FILE_REFRESH").seed = "KEEP"
            row.operator("t2vz.regenerate", text="New Seed", icon="MOD_NOISE").seed = "NEW"
            draw_takes(layout, context, strip)
        if busy or status.progress > 0:
            if hasattr(layout, "progress"):
                layout.progress(
                    factor=status.progress, type="BAR", text=status.message or status.state.title()
                )
            else:  # pragma: no cover (Blender < 4.0)
                layout.prop(status, "progress", text=status.message)
        elif status.message:
            layout.label(text=status.message, icon="INFO")
        if status.error:
            col = layout.column(align=True)
            col.alert = True
            for i, line in enumerate(textwrap.wrap(status.error, 60, break_long_words=False)):
                col.label(text=line, icon="ERROR" if i == 0 else "BLANK1")
        draw_queue(layout)
        icon_id = runtime.RUNNER.preview_icon_id()
        if icon_id:
            layout.template_icon(icon_value=icon_id, scale=8.0)
        if strips.stored_job(strip) is not None:
            layout.operator("t2vz.load_settings", icon="IMPORT")


def draw_frames(layout: Any, context: Any) -> None:
    """Which frames the job covers, a warning past the scene's end, and a long job's time."""
    scene = context.scene
    settings = scene.t2vz
    text = operators.frames_text(context)
    if text:
        layout.label(text=text, icon="TIME")
        first, count = operators.job_frames(scene, settings)
        warning = operators.past_end_text(scene, first, count)
        if warning:
            row = layout.row()
            row.alert = True
            row.label(text=warning, icon="ERROR")
    estimate = runtime.estimate_text(*operators.panel_estimate(context))
    if estimate:
        layout.label(text=estimate, icon="SORTTIME")


def draw_takes(layout: Any, context: Any, strip: Any) -> None:
    """The takes of a generated strip: which one this is, and a button to show each."""
    group, number = strips.take_of(strip)
    takes = strips.takes(context.scene.sequence_editor, group)
    if len(takes) < 2:
        return
    col = layout.column(align=True)
    col.label(text=f"Take {number} of {len(takes)}", icon="RENDERLAYERS")
    row = col.row(align=True)
    for take in takes:
        shown = take.name == strip.name or not take.mute
        op = row.operator(
            "t2vz.take_show",
            text=str(strips.take_of(take)[1]),
            depress=shown and not take.mute,
        )
        op.strip_name = take.name


def draw_queue(layout: Any) -> None:
    """The queued jobs, each with a button that takes it out of the queue."""
    queue = runtime.RUNNER.queue
    if not queue:
        return
    box = layout.box()
    box.label(text=f"Queue ({len(queue)})", icon="SORTTIME")
    for queued in queue:
        row = box.row(align=True)
        row.label(text=f"{queued.name} ({queued.job.get('frames')} frames)")
        row.operator("t2vz.queue_remove", text="", icon="X").job_id = queued.id


class T2VZ_PT_controlnets(_SequencerPanel, bpy.types.Panel):
    """The job's ControlNets, each with its control source, detector and weight."""

    bl_label = "ControlNets"
    bl_parent_id = "T2VZ_PT_main"

    @classmethod
    def poll(cls, context: Any) -> bool:
        return context.scene is not None and context.scene.t2vz.mode == "controlnet"

    def draw(self, context: Any) -> None:
        layout = self.layout
        settings = context.scene.t2vz
        row = layout.row()
        row.template_list(
            "T2VZ_UL_controlnets", "", settings, "controlnets", settings, "controlnet_index", rows=2
        )
        col = row.column(align=True)
        col.operator("t2vz.controlnet_add", text="", icon="ADD")
        col.operator("t2vz.controlnet_remove", text="", icon="REMOVE")
        if not 0 <= settings.controlnet_index < len(settings.controlnets):
            return
        item = settings.controlnets[settings.controlnet_index]
        col = layout.column()
        col.use_property_split = True
        col.prop(item, "source")
        if item.source == "STRIP":
            editor = context.scene.sequence_editor
            if editor is not None:
                name = "strips_all" if hasattr(editor, "strips_all") else "sequences_all"
                col.prop_search(item, "strip_name", editor, name)
        if item.source == "SCENE":
            col.prop(item, "scene_pass")
            col.operator("t2vz.control_preview", icon="HIDE_OFF")
            module = operators._scene_control()
            if module is not None and hasattr(module, "draw_control_settings"):
                module.draw_control_settings(col, context, item)
            elif module is None:
                col.label(text="Scene control is not installed", icon="ERROR")
        else:
            draw_detectors(col, context, item)
        row = preferences.draw_hub_field(col, item, "model", "controlnet")
        row.menu(T2VZ_MT_controlnet_models.bl_idname, text="", icon="DOWNARROW_HLT")
        draw_controlnet_family(col, context, item)
        col.prop(item, "weight")


class T2VZ_MT_controlnet_models(bpy.types.Menu):
    """ControlNets for the selected entry: the base model's family's, the entry's kind first."""

    bl_idname = "T2VZ_MT_controlnet_models"
    bl_label = "ControlNets"

    def draw(self, context: Any) -> None:
        layout = self.layout
        settings = context.scene.t2vz
        if not 0 <= settings.controlnet_index < len(settings.controlnets):
            layout.label(text="Select a ControlNet")
            return
        item = settings.controlnets[settings.controlnet_index]
        prefs = preferences.get_prefs(context)
        base = settings.size_model()
        family = model_families.model_family(base)
        if family is None:
            layout.label(text=f"Every family's (the base model {base}'s cannot be told)")
        else:
            layout.label(text=f"{model_families.label(family)}, as the base model {base}")
        kind = model_families.kind_of(item.to_values())
        default = operators.controlnet_model(context, {**item.to_values(), "model": ""})
        text = f"Default: {default}" if default else "Default (none set for this kind)"
        layout.operator("t2vz.controlnet_use", text=text, icon="LOOP_BACK").model = ""
        own = [prefs.controlnet_canny, prefs.controlnet_openpose, prefs.controlnet_depth]
        own += [c.model for c in settings.controlnets]
        for offer in model_families.offered_controlnets(family, kind, own):
            icon = "QUESTION" if offer.family is None else "NONE"
            layout.operator("t2vz.controlnet_use", text=offer.text, icon=icon).model = offer.model


class T2VZ_PT_adapters(_SequencerPanel, bpy.types.Panel):
    """LoRAs (with a weight) and textual inversion embeddings (called by their token)."""

    bl_label = "LoRAs & Embeddings"
    bl_parent_id = "T2VZ_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: Any) -> None:
        layout = self.layout
        settings = context.scene.t2vz
        row = layout.row()
        row.template_list(
            "T2VZ_UL_adapters", "", settings, "adapters", settings, "adapter_index", rows=2
        )
        col = row.column(align=True)
        col.operator("t2vz.adapter_add", text="", icon="ADD").kind = "LORA"
        col.operator("t2vz.adapter_add", text="", icon="FONT_DATA").kind = "EMBEDDING"
        col.operator("t2vz.adapter_remove", text="", icon="REMOVE")
        if not 0 <= settings.adapter_index < len(settings.adapters):
            layout.label(text="+ adds a LoRA, the text icon an embedding", icon="INFO")
            return
        item = settings.adapters[settings.adapter_index]
        col = layout.column()
        col.use_property_split = True
        col.prop(item, "kind")
        preferences.draw_hub_field(col, item, "path", item.kind.lower())
        if item.kind == "LORA":
            col.prop(item, "weight")
        else:
            col.prop(item, "token")
            if item.token.strip() and item.token.strip() not in settings.prompt:
                col.label(text=f"Use {item.token.strip()} in the prompt", icon="INFO")


class T2VZ_PT_settings(_SequencerPanel, bpy.types.Panel):
    """Seed, sampling, motion, frames and size."""

    bl_label = "Settings"
    bl_parent_id = "T2VZ_PT_main"

    def draw(self, context: Any) -> None:
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        settings = context.scene.t2vz
        presets.draw_menu(layout)
        row = layout.row(align=True)
        row.prop(settings, "seed")
        row.operator("t2vz.randomize_seed", text="", icon="FILE_REFRESH")
        col = layout.column(align=True)
        col.prop(settings, "steps")
        col.prop(settings, "guidance")
        if settings.mode == "pix2pix":
            col.prop(settings, "image_guidance")
        if settings.mode == "text2video":
            layout.prop(settings, "motion")
        col = layout.column(align=True)
        sourced = operators.has_source_strip(settings)
        if sourced:  # Match Source Strip only where a strip sets the frames
            col.prop(settings, "match_source")
        else:
            col.prop(settings, "frame_range")
        sub = col.column(align=True)
        sub.active = (not sourced and settings.frame_range == "CURRENT") or (
            sourced and not settings.match_source
        )
        sub.prop(settings, "frames")
        draw_size(layout, context.scene, settings)
        if settings.mode != "text2video":  # a source or control strip meets the size
            layout.prop(settings, "fit")
        layout.prop(settings, "chunk_size")
        if settings.mode != "text2video":  # flow follows the source or control video
            layout.prop(settings, "consistency")
        if settings.mode != "pix2pix":  # pix2pix follows its source: no smoothing
            row = layout.row(heading="Background")
            row.prop(settings, "smooth_bg", text="Smooth")
            sub = row.row()
            sub.active = settings.smooth_bg
            sub.prop(settings, "smooth_alpha", text="")


class T2VZ_PT_advanced(_SequencerPanel, bpy.types.Panel):
    """What the model predicts (epsilon or v); when text to video's motion is applied."""

    bl_label = "Advanced"
    bl_parent_id = "T2VZ_PT_settings"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: Any) -> None:
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        settings = context.scene.t2vz
        layout.prop(settings, "prediction_type")
        if settings.mode != "text2video":
            return
        layout.prop(settings, "custom_timesteps")
        col = layout.column(align=True)
        col.active = settings.custom_timesteps
        col.prop(settings, "t0")
        col.prop(settings, "t1")


class T2VZ_PT_output(_SequencerPanel, bpy.types.Panel):
    """Where results are written."""

    bl_label = "Output"
    bl_parent_id = "T2VZ_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: Any) -> None:
        layout = self.layout
        settings = context.scene.t2vz
        layout.prop(settings, "output_dir", text="")
        layout.label(text=str(operators._output_root(settings)), icon="FILE_FOLDER")
        layout.prop(settings, "write_mp4")
        status = context.window_manager.t2vz_status
        if status.worker_pid:
            layout.label(text=f"Backend worker running (pid {status.worker_pid})", icon="CHECKMARK")
        layout.operator("t2vz.restart_worker", icon="X")


def draw_wrapped(layout: Any, text: str, icon: str, alert: bool = False) -> None:
    """``text`` wrapped at 60 characters, ``icon`` on its first line; nothing when empty."""
    if not text:
        return
    col = layout.column(align=True)
    col.alert = alert
    for i, line in enumerate(textwrap.wrap(text, 60, break_long_words=False)):
        col.label(text=line, icon=icon if i == 0 else "BLANK1")


def controlnet_mismatch(context: Any, item: Any) -> str:
    """Why ControlNet entry ``item`` cannot run on the panel's base model; "" if it can."""
    model = operators.controlnet_model(context, item.to_values())
    if not model:
        return ""
    base = context.scene.t2vz.size_model()
    return model_families.mismatch(
        model, model_families.model_family(model), base, model_families.model_family(base)
    )


def draw_controlnet_family(layout: Any, context: Any, item: Any) -> None:
    """The model the entry will use, its family against the base model's (a warning naming
    both when they differ), and a pickled known model's need for Allow Pickled Weights."""
    model = operators.controlnet_model(context, item.to_values())
    if not model:
        return
    if not item.model.strip():
        layout.label(text=f"Uses {model}", icon="INFO")
    problem = controlnet_mismatch(context, item)
    family = model_families.model_family(model)
    if problem:
        draw_wrapped(layout, problem, "ERROR", alert=True)
    elif family is None:
        draw_wrapped(
            layout, "Family unknown until it is downloaded: the backend checks it", "QUESTION"
        )
    else:
        layout.label(text=f"{model_families.label(family)} ControlNet", icon="CHECKMARK")
    prefs = preferences.get_prefs(context)
    if model_families.is_pickled(model) and not getattr(prefs, "allow_pickle", False):
        draw_wrapped(
            layout,
            "Its weights are pickled (.bin): it loads only with Allow Pickled Weights",
            "ERROR",
        )


def draw_detectors(layout: Any, context: Any, item: Any) -> None:
    """The detector choice with Preview Detector; detectors the backend environment lacks,
    and controlnet-aux's while pickled weights are not allowed, are greyed out."""
    prefs = preferences.get_prefs(context)
    python = preferences.backend_python(prefs)
    available = capabilities.detector_availability(python) or {}
    pickled = capabilities.pickled_detectors()
    allow_pickle = bool(getattr(prefs, "allow_pickle", False))
    col = layout.column(align=True)
    col.label(text="Detector")
    row = col.row(align=True)
    for identifier, name, _ in DETECTOR_ITEMS:
        if identifier in pickled:
            continue
        sub = row.row(align=True)
        sub.enabled = available.get(identifier, True)
        sub.prop_enum(item, "detector", identifier, text=name)
    extras = [(i, name) for i, name, _ in DETECTOR_ITEMS if i in pickled]
    if extras:
        row = col.row(align=True)
        for identifier, name in extras:
            sub = row.row(align=True)
            sub.enabled = available.get(identifier, True) and allow_pickle
            sub.prop_enum(item, "detector", identifier, text=name)
    col.operator("t2vz.detector_preview", icon="HIDE_OFF")
    if extras and not allow_pickle:
        note = col.column(align=True)
        note.alert = item.detector in pickled
        names = ", ".join(name for _, name in extras)
        for i, line in enumerate(
            textwrap.wrap(f"{names} {capabilities.PICKLE_HINT}", 60, break_long_words=False)
        ):
            note.label(text=line, icon="INFO" if i == 0 else "BLANK1")
    missing = [(i, name) for i, name, _ in DETECTOR_ITEMS if not available.get(i, True)]
    if not missing:
        return
    box = col.column(align=True)
    box.alert = item.detector in {i for i, _ in missing}
    by_needs: dict[str, list[str]] = {}  # detectors that lack the same modules, together
    for identifier, name in missing:
        needs = ", ".join(capabilities.missing_modules(identifier, python))
        by_needs.setdefault(needs, []).append(name)
    for needs, names in by_needs.items():
        box.label(text=f"{', '.join(names)}: need {needs}", icon="INFO")
    for line in textwrap.wrap(capabilities.INSTALL_HINT, 60, break_long_words=False):
        box.label(text=line, icon="BLANK1")


def draw_size(layout: Any, scene: Any, settings: Any) -> None:
    """The size choice, the size the job will use, and a warning far above native."""
    col = layout.column(align=True)
    col.prop(settings, "size_mode")
    if settings.size_mode == "CUSTOM":
        col.prop(settings, "width")
        col.prop(settings, "height")
    width, height = settings.size(scene)
    side = settings.native_side()
    ratio = sizing.pixel_ratio(width, height, side)
    family = sizing.family_label(settings.size_model())  # None: not on disk (a hub id)
    of = f" ({family})" if family else ""
    text = f"{width} x {height} px, {ratio:.1f}x native {side}x{side}{of}"
    col.label(text=text, icon="IMAGE_DATA")
    if sizing.is_oversize(width, height, side):
        warn = layout.column(align=True)
        warn.alert = True
        warn.label(text=f"{ratio:.1f}x the model's native pixel count:", icon="ERROR")
        warn.label(text="expect repeated subjects, more memory and time", icon="BLANK1")


classes = (
    T2VZ_UL_controlnets,
    T2VZ_UL_adapters,
    T2VZ_PT_main,
    T2VZ_PT_controlnets,
    T2VZ_MT_controlnet_models,
    T2VZ_PT_adapters,
    T2VZ_PT_settings,
    T2VZ_PT_advanced,
    T2VZ_PT_output,
)


# Registers the classes in order and unregisters them in reverse.
register, unregister = bpy.utils.register_classes_factory(classes)
