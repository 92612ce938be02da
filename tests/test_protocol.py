"""backend/protocol.py: the job schema, t0/t1 scaling and the worker's message lines."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from backend.protocol import (
    DEFAULT_MODEL,
    DEFAULT_MOTION,
    DEFAULT_PIX2PIX_MODEL,
    MAX_LINE_BYTES,
    MAX_PROMPT_CHARS,
    REPLIES,
    REQUESTS,
    ControlNetSpec,
    JobError,
    VideoInput,
    decode_message,
    encode_message,
    host_tag,
    hub_id_problem,
    parse_json,
    partial_name,
    partial_owner,
    pid_alive,
    resolve_t0_t1,
    stale_partials,
    sweep_stale_partials,
    validate_job,
)


def job(**fields: Any) -> dict[str, Any]:
    """A minimal valid text2video job with ``fields`` changed."""
    return {"prompt": "a cat", "out": "/tmp/out", **fields}


CONTROLNET = {"model": "builtin:tiny-controlnet", "control": "/tmp/control"}


def test_minimal_job_gets_documented_defaults() -> None:
    j = validate_job(job())
    assert (j.mode, j.model, j.frames, j.width, j.height, j.steps) == (
        "text2video",
        DEFAULT_MODEL,
        8,
        None,  # the model's native size (512x512 on SD 1.x), resolved by the runner
        None,
        50,
    )
    assert (j.t0, j.t1) == (44, 47)  # text2video resolves the official t0/t1
    assert j.effective_motion == DEFAULT_MOTION
    assert j.frame_indices == list(range(8))


def test_job_round_trips_through_json() -> None:
    original = validate_job(
        job(
            mode="controlnet",
            controlnets=[{**CONTROLNET, "weight": 0.5, "detector": "canny"}],
            frames=5,
            frame_range=[2, 4],
            motion=[3, -4.5],
            smooth_bg=True,
            masks={"path": "/tmp/masks", "start": 2, "stride": 0.5},
        )
    )
    again = validate_job(json.loads(original.to_json()))
    assert again == original
    assert again.controlnets == [
        ControlNetSpec("builtin:tiny-controlnet", VideoInput("/tmp/control"), 0.5, "canny")
    ]
    assert again.masks == VideoInput("/tmp/masks", 2, 0.5)
    assert again.frame_indices == [1, 2, 3]
    assert again.effective_motion == (3.0, -4.5)


def test_mode_defaults() -> None:
    assert validate_job(job(mode="pix2pix", video="/v")).model == DEFAULT_PIX2PIX_MODEL
    cn = validate_job(job(mode="controlnet", controlnets=[CONTROLNET]))
    assert cn.effective_motion == (0.0, 0.0)
    assert (cn.t0, cn.t1) == (None, None)  # no motion: no motion-dynamics phase
    moving = validate_job(job(mode="controlnet", controlnets=[CONTROLNET], motion=[4, 0], steps=10))
    assert moving.t0 is not None and moving.t0 < moving.t1 < 10


@pytest.mark.parametrize(
    ("fields", "field", "value_text"),
    [
        ({"colour": "red"}, "colour", "red"),
        ({"controlnets": [{**CONTROLNET, "strength": 2}]}, "controlnets[0].strength", "2"),
        ({"video": {"path": "/v", "fps": 3}}, "video.fps", "3"),
        ({"frames": "8"}, "frames", "'8'"),
        ({"frames": True}, "frames", "True"),
        ({"frames": 2.5}, "frames", "2.5"),
        ({"prompt": 5}, "prompt", "5"),
        ({"smooth_bg": "yes"}, "smooth_bg", "yes"),
        ({"motion": "12"}, "motion", "12"),
        ({"motion": [1, 2, 3]}, "motion", "[1, 2, 3]"),
        ({"motion": [1, "x"]}, "motion[1]", "x"),
        ({"frames": 0}, "frames", "0"),
        ({"steps": 0}, "steps", "0"),
        ({"guidance": -1}, "guidance", "-1"),
        ({"guidance": float("nan")}, "guidance", "nan"),
        ({"smooth_alpha": 1.5}, "smooth_alpha", "1.5"),
        ({"seed": -1}, "seed", "-1"),
        ({"width": 32}, "width", "32"),
        ({"width": 100}, "width", "100"),
        ({"height": 180}, "height", "180"),
        ({"chunk_size": 0}, "chunk_size", "0"),
        ({"frames": 8, "frame_range": [1, 9]}, "frame_range[1]", "9"),
        ({"frames": 8, "frame_range": [0, 3]}, "frame_range[0]", "0"),
        ({"frames": 8, "frame_range": [5, 3]}, "frame_range", "5:3"),
        ({"frame_range": [1]}, "frame_range", "[1]"),
        ({"mode": "img2img"}, "mode", "img2img"),
        ({"device": "tpu"}, "device", "tpu"),
        ({"dtype": "int8"}, "dtype", "int8"),
        ({"version": 2}, "version", "2"),
        ({"out": ""}, "out", "empty"),
        ({"model": " "}, "model", "empty"),
        ({"model_config": 3}, "model_config", "3"),
        ({"video": {"start": 1}}, "video.path", "required"),
        ({"video": {"path": "/v", "stride": 0}}, "video.stride", "0"),
        ({"video": {"path": "/v", "start": -2}}, "video.start", "-2"),
        ({"video": {"path": "/v", "indices": [0, -1]}}, "video.indices[1]", "-1"),
        ({"video": {"path": "/v", "indices": []}}, "video.indices", "got 0"),
        ({"video": {"path": "/v", "indices": "0,1"}}, "video.indices", "'0,1'"),
    ],
)
def test_bad_fields_are_named(fields: dict, field: str, value_text: str) -> None:
    with pytest.raises(JobError) as info:
        validate_job(job(**fields))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert value_text in str(info.value)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"mode": "controlnet"}, "controlnets"),
        ({"mode": "controlnet", "controlnets": [{"model": "m"}]}, "controlnets[0].control"),
        ({"mode": "controlnet", "controlnets": [{"control": "c"}]}, "controlnets[0].model"),
        (
            {"mode": "controlnet", "controlnets": [{**CONTROLNET, "weight": 11}]},
            "controlnets[0].weight",
        ),
        (
            {"mode": "controlnet", "controlnets": [{**CONTROLNET, "detector": "sobel"}]},
            "controlnets[0].detector",
        ),
        ({"mode": "controlnet", "controlnets": CONTROLNET}, "controlnets"),
        ({"mode": "controlnet", "controlnets": [CONTROLNET], "video": "/v"}, "video"),
        ({"mode": "controlnet", "controlnets": [CONTROLNET], "t0": 3}, "t0"),
        ({"mode": "pix2pix"}, "video"),
        ({"mode": "pix2pix", "video": "/v", "controlnets": [CONTROLNET]}, "controlnets"),
        ({"mode": "pix2pix", "video": "/v", "motion": [1, 0]}, "motion"),
        ({"mode": "pix2pix", "video": "/v", "t1": 3}, "t0"),
        ({"mode": "pix2pix", "video": "/v", "smooth_bg": True}, "smooth_bg"),
        ({"controlnets": [CONTROLNET]}, "controlnets"),
        ({"video": "/v"}, "video"),
        ({"masks": "/m"}, "masks"),
        ({"steps": 1}, "steps"),
        ({"steps": 10, "t1": 10}, "t1"),
        ({"steps": 10, "t0": 6, "t1": 6}, "t0"),
    ],
)
def test_cross_field_rules_name_the_field(fields: dict, field: str) -> None:
    with pytest.raises(JobError) as info:
        validate_job(job(**fields))
    assert info.value.field == field


@pytest.mark.parametrize("missing", ["prompt", "out"])
def test_required_fields(missing: str) -> None:
    data = job()
    del data[missing]
    with pytest.raises(JobError, match=f"^{missing}: is required"):
        validate_job(data)


def test_job_must_be_an_object() -> None:
    with pytest.raises(JobError) as info:
        validate_job(["prompt", "out"])
    assert info.value.field == "job"


def test_video_path_shorthand_and_zero_motion_pix2pix() -> None:
    j = validate_job(job(mode="pix2pix", video="/clip.mp4", motion=[0, 0]))
    assert j.video == VideoInput("/clip.mp4", 0, 1.0)
    assert (j.t0, j.t1) == (None, None)


# --------------------------------------------------------------------------- t0 / t1


def test_official_t0_t1_for_50_steps() -> None:
    assert resolve_t0_t1(50) == (44, 47)


@pytest.mark.parametrize("steps", range(2, 101))
def test_t0_t1_scale_to_any_step_count(steps: int) -> None:
    t0, t1 = resolve_t0_t1(steps)
    assert 0 <= t0 < t1 <= steps - 1
    # The share of the schedule frame 1 runs alone before t1 and t0 follows 2/50 and 5/50.
    assert abs((steps - 1 - t1) - steps * 2 / 50) <= 1
    assert abs((steps - 1 - t0) - steps * 5 / 50) <= 1 or t0 == t1 - 1
    j = validate_job(job(steps=steps))
    assert (j.t0, j.t1) == (t0, t1)


def test_one_step_is_refused_clearly() -> None:
    with pytest.raises(JobError) as info:
        resolve_t0_t1(1)
    assert info.value.field == "steps"
    assert "at least 2 steps" in str(info.value)


def test_given_t0_t1_are_kept_and_checked() -> None:
    assert resolve_t0_t1(20, 5, 9) == (5, 9)
    assert resolve_t0_t1(20, t0=17) == (17, 18)  # t1 made to exceed a late t0
    t0, t1 = resolve_t0_t1(20, t1=4)
    assert t0 == 3 and t1 == 4  # t0 made to stay below an early t1
    with pytest.raises(JobError, match="t0"):
        resolve_t0_t1(20, t0=19)


# --------------------------------------------------------------------------- messages


def test_messages_round_trip() -> None:
    line = encode_message("progress", id="j1", step=3, total=10, fraction=0.25)
    assert "\n" not in line
    assert decode_message(line) == {
        "type": "progress",
        "id": "j1",
        "step": 3,
        "total": 10,
        "fraction": 0.25,
    }
    for kind in REQUESTS + REPLIES:
        assert decode_message(encode_message(kind))["type"] == kind


def test_error_messages_carry_their_own_kind_field() -> None:
    line = encode_message("error", id="j1", kind="JobError", message="width: bad", traceback="")
    assert decode_message(line) == {
        "type": "error",
        "id": "j1",
        "kind": "JobError",
        "message": "width: bad",
        "traceback": "",
    }


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"type": "explode"}', '{"id": 1}'])
def test_decode_refuses_non_protocol_lines(line: str) -> None:
    with pytest.raises(ValueError):
        decode_message(line)


NESTED = '{"type": "cancel", "id": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (NESTED, "nested too deeply"),  # was a RecursionError that killed the reader thread
        ('{"type": "cancel", "id": ' + "[" * 200 + "]" * 200 + "}", "message id"),
        (b'{"type": "shutdown", "x": "\xff\xfe"}', "not UTF-8"),
        ('"shutdown"', "not a protocol message"),
        ("null", "not a protocol message"),
        ('{"type": "cancel", "id": "' + "x" * MAX_LINE_BYTES + '"}', "the limit is"),
    ],
)
def test_hostile_lines_are_value_errors_with_short_messages(line: str | bytes, reason: str) -> None:
    """Any line becomes a ValueError (never RecursionError or UnicodeDecodeError) whose
    message is short whatever the line's size."""
    with pytest.raises(ValueError, match=reason) as info:
        decode_message(line)
    assert len(str(info.value)) < 300


def test_error_messages_show_a_huge_bad_value_cut_short_with_its_length() -> None:
    """A 5 MB bad value used to be echoed whole into stderr and worker replies."""
    huge = "x" * 5_000_000
    for fields, field in (
        ({"colour": huge}, "colour"),
        ({"frames": huge}, "frames"),
        ({"mode": huge}, "mode"),
        ({"motion": [1.0] * 1_000_000}, "motion"),
        ({"model_config": [[[[[["deep"]]]]]]}, "model_config"),
    ):
        with pytest.raises(JobError) as info:
            validate_job(job(**fields))
        text = str(info.value)
        assert info.value.field == field and len(text) < 300, text[:300]
    assert "5000000 characters" in _error_text(frames=huge)
    assert "1000000 items" in _error_text(motion=[1.0] * 1_000_000)


def _error_text(**fields: Any) -> str:
    with pytest.raises(JobError) as info:
        validate_job(job(**fields))
    return str(info.value)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompts_have_a_documented_length_limit(field: str) -> None:
    """A 50 MB prompt used to run for minutes and "succeed"; now it is a clear error."""
    assert getattr(validate_job(job(**{field: "a" * MAX_PROMPT_CHARS})), field)
    text = _error_text(**{field: "a" * (MAX_PROMPT_CHARS + 1)})
    assert text.startswith(f"{field}: must be at most {MAX_PROMPT_CHARS} characters, got ")
    assert str(MAX_PROMPT_CHARS + 1) in text and len(text) < 300


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_staging_folder_names_carry_host_and_pid() -> None:
    name = partial_name("shot 1.partial-x", pid=4242)
    assert name.startswith(".shot 1.partial-x.partial-")
    assert partial_owner(name) == (host_tag(), 4242)
    assert partial_owner(partial_name("a")) == (host_tag(), os.getpid())
    for other in (".a.partial-1234abcd", "a.partial-h-12-1234abcd", ".a.partial-h-x-1234abcd"):
        assert partial_owner(other) is None


def test_liveness_of_processes() -> None:
    assert pid_alive(os.getpid()) and pid_alive(os.getppid())
    assert not pid_alive(_dead_pid())


def test_only_stale_staging_folders_of_this_machine_are_swept(tmp_path: Path) -> None:
    """Folders of killed processes (SIGKILL, the OOM killer) stayed forever."""
    dead = _dead_pid()
    stale = tmp_path / partial_name("shot", pid=dead)
    live = tmp_path / partial_name("shot", pid=os.getppid())
    mine = tmp_path / partial_name("other")
    elsewhere = tmp_path / f".shot.partial-another_host-{dead}-0123abcd"
    legacy = tmp_path / ".shot.partial-0123abcd"  # no owner recorded: never guessed at
    result = tmp_path / "shot"
    for folder in (stale, live, mine, elsewhere, legacy, result):
        folder.mkdir()
        (folder / "frame_00001.png").write_bytes(b"x")
    not_a_folder = tmp_path / partial_name("file", pid=dead)
    not_a_folder.write_bytes(b"x")
    assert stale_partials(tmp_path) == [stale]
    assert sweep_stale_partials(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, mine, elsewhere, legacy, result, not_a_folder)
    )
    assert stale_partials(tmp_path / "missing") == []


def test_a_machine_with_the_same_host_name_keeps_its_staging_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two VMs named alike share a render disk: a PID dead here may live there."""
    import socket

    import backend.protocol as protocol

    dead = _dead_pid()
    host = re.sub(r"\W", "_", socket.gethostname(), flags=re.ASCII)[:32]
    other_boot = "ffffffff" if protocol.boot_tag() != "ffffffff" else "eeeeeeee"
    twin = tmp_path / f".shot.partial-{host}_{other_boot}-{dead}-0123abcd"
    old_style = tmp_path / f".shot.partial-{host}-{dead}-0123abcd"  # host name alone
    ours = tmp_path / partial_name("shot", pid=dead)
    for folder in (twin, old_style, ours):
        folder.mkdir()
    assert protocol.boot_tag() and host_tag() == f"{host}_{protocol.boot_tag()}"
    assert sweep_stale_partials(tmp_path) == [ours]
    assert twin.is_dir() and old_style.is_dir()
    # Where this system's boot cannot be told, nothing is swept: no PID can be trusted.
    monkeypatch.setattr(protocol, "boot_tag", lambda: "")
    ours.mkdir()
    assert stale_partials(tmp_path) == []


def test_hub_ids_longer_than_the_hubs_limits_are_refused_in_one_line() -> None:
    assert hub_id_problem("o/" + "n" * 96) == ""
    assert "96 characters" in hub_id_problem("o/" + "n" * 97)
    assert "512 characters" in hub_id_problem("o/n/" + "f" * 5000 + ".safetensors")
    assert "512 characters" in hub_id_problem("a" * 5000)


def test_a_file_that_is_not_json_is_never_quoted() -> None:
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA"
    with pytest.raises(ValueError) as info:
        parse_json(key, "job file x", excerpt=False)
    assert "job file x" in str(info.value) and "PRIVATE" not in str(info.value)
    with pytest.raises(ValueError, match="PRIVATE"):  # protocol lines keep their excerpt
        parse_json(key, "protocol line")


def test_encode_refuses_unknown_types() -> None:
    with pytest.raises(ValueError):
        encode_message("explode")


def test_protocol_module_stays_stdlib_only() -> None:
    """Blender's Python imports the protocol: it must not pull in torch/numpy."""
    import subprocess
    import sys

    code = (
        "import sys, backend.protocol\n"
        "heavy = {'torch', 'numpy', 'cv2', 'diffusers', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=60)


# --------------------------------------------------------------------------- presets


def test_official_controlnet_preset_fills_only_what_is_left_out() -> None:
    from backend.protocol import PRESETS, apply_preset

    preset = PRESETS["official-controlnet"]
    raw = {"prompt": "a dancer", "out": "o", "controlnets": [CONTROLNET]}
    filled = validate_job(apply_preset(raw, "official-controlnet"))
    assert filled.mode == "controlnet" and (filled.steps, filled.guidance) == (20, 9.0)
    assert filled.prompt == "a dancer, best quality, extremely detailed"
    assert filled.negative_prompt == preset.negative_prompt
    assert "bad hands" in filled.negative_prompt
    assert raw == {"prompt": "a dancer", "out": "o", "controlnets": [CONTROLNET]}  # not mutated
    # What the user gave wins; applying twice adds the words once (a job.json run again).
    given = {**raw, "steps": 30, "negative_prompt": "blurry", "guidance": 5.0}
    again = apply_preset(apply_preset(given, "official-controlnet"), "official-controlnet")
    assert (again["steps"], again["guidance"], again["negative_prompt"]) == (30, 5.0, "blurry")
    assert again["prompt"] == "a dancer, best quality, extremely detailed"
    assert validate_job(again).to_dict()["prompt"] == again["prompt"]  # job.json: final prompt


def test_official_text2video_preset_and_mode_mismatch() -> None:
    from backend.protocol import apply_preset

    t2v = validate_job(apply_preset(job(prompt="a panda, "), "official-text2video"))
    assert t2v.mode == "text2video" and t2v.steps == 50 and t2v.negative_prompt == ""
    assert t2v.prompt == (
        "a panda, high quality, HD, 8K, trending on artstation, high focus, dramatic lighting"
    )
    with pytest.raises(JobError, match="official-controlnet is made for mode controlnet"):
        apply_preset(job(mode="pix2pix"), "official-controlnet")
    with pytest.raises(JobError, match="preset: must be one of"):
        apply_preset(job(), "cinematic")


def test_video_indices_round_trip_and_stay_out_of_job_json_when_unset() -> None:
    listed = validate_job(job(mode="pix2pix", video={"path": "/v", "indices": [2, 2, 3, 5]}))
    assert listed.video == VideoInput("/v", indices=[2, 2, 3, 5])
    assert validate_job(json.loads(listed.to_json())) == listed
    plain = validate_job(job(mode="pix2pix", video="/v")).to_dict()
    assert plain["video"] == {"path": "/v", "start": 0, "stride": 1.0}


# --------------------------------------------------------------------------- size and fit


def test_size_defaults_to_none_and_fit_to_crop() -> None:
    from backend.protocol import FITS

    j = validate_job(job())
    assert (j.width, j.height, j.fit) == (None, None, "crop")
    assert validate_job(job(fit="pad", width=64)).to_dict()["fit"] == "pad"
    assert FITS == ("crop", "pad", "stretch")
    with pytest.raises(JobError, match="fit: must be one of crop, pad, stretch, got 'zoom'"):
        validate_job(job(fit="zoom"))


def test_resolve_size_keeps_native_pixel_count_at_the_input_aspect() -> None:
    from backend.protocol import resolve_size

    assert resolve_size(None, None, 16 / 9, 512) == (680, 384)  # SD 1.x, a 16:9 input
    assert resolve_size(None, None, 9 / 16, 512) == (384, 680)
    assert resolve_size(None, None, 1.0, 512) == (512, 512)  # text2video: square
    assert resolve_size(None, None, 4 / 3, 768) == (888, 664)
    for aspect in (16 / 9, 4 / 3, 2.35, 0.5):
        w, h = resolve_size(None, None, aspect, 512)
        assert w % 8 == 0 and h % 8 == 0
        assert abs(w * h / 512**2 - 1) < 0.03 and abs(w / h / aspect - 1) < 0.03
    assert resolve_size(768, None, 16 / 9, 512) == (768, 432)  # one side given: the aspect
    assert resolve_size(None, 432, 16 / 9, 512) == (768, 432)
    assert resolve_size(640, 480, 16 / 9, 512) == (640, 480)  # both given: kept
    with pytest.raises(ValueError, match="aspect must be a positive number"):
        resolve_size(None, None, 0.0, 512)


# --------------------------------------------------------------------------- mutation survivors
# Field names, defaults and messages the mutation run (docs/mutation.md) found unchecked.


def error_of(data: dict[str, Any]) -> JobError:
    with pytest.raises(JobError) as caught:
        validate_job(data)
    return caught.value


def test_defaults_of_the_switches_a_job_may_leave_out() -> None:
    plain = validate_job(job())
    assert plain.save_latents is False and plain.allow_pickle is False
    asked = validate_job(job(save_latents=True, allow_pickle=True))
    assert asked.save_latents is True and asked.allow_pickle is True


def test_errors_name_the_exact_field_and_say_what_is_wrong() -> None:
    assert str(error_of(job(colour="red"))) == "colour: unknown field (value 'red')"
    assert error_of(job(save_latents="yes")).field == "save_latents"
    assert str(error_of(job(steps="ten"))) == "steps: expected int, got str 'ten'"
    assert str(error_of(job(mode="pix2pix", video="/v", t0=3))) == (
        "t0: t0/t1 apply only to motion dynamics, not pix2pix"
    )
    cn = [{"model": "m", "control": "/c"}]
    assert str(error_of(job(mode="controlnet", video="/v", controlnets=cn))) == (
        "video: controlnet mode takes its videos as controlnets[].control"
    )


def test_adapters_need_a_path_a_bounded_weight_and_distinct_tokens() -> None:
    assert error_of(job(loras=[{"weight": 0.5}])).field == "loras[0].path"
    assert validate_job(job(loras=[{"path": "/l", "weight": -10.0}])).loras[0].weight == -10.0
    assert error_of(job(loras=[{"path": "/l", "weight": -10.5}])).field == "loras[0].weight"
    twice = [{"path": "/a", "token": "<t>"}, {"path": "/b", "token": "<t>"}]
    assert str(error_of(job(embeddings=twice))) == "embeddings[1].token: '<t>' is used twice"


def test_pid_0_is_never_a_live_process() -> None:
    assert pid_alive(0) is False and pid_alive(-1) is False and pid_alive(os.getpid()) is True


def controlnet_job(**controlnet: Any) -> dict[str, Any]:
    """A controlnet job whose one ControlNet has ``controlnet``'s fields."""
    spec = {"model": "m", "control": "/tmp/c", **controlnet}
    return job(mode="controlnet", controlnets=[spec])


def test_detector_weights_may_be_replaced_per_controlnet_by_role() -> None:
    from backend.protocol import DETECTOR_MODELS, detector_models

    pose = {"pose": "me/vitpose-small"}
    spec = validate_job(controlnet_job(detector="openpose", detector_models=pose)).controlnets[0]
    assert spec.detector_models == pose
    assert detector_models("openpose", spec.detector_models) == {
        "person": DETECTOR_MODELS["openpose"]["person"],
        "pose": "me/vitpose-small",
    }
    assert detector_models("canny") == {}
    plain = validate_job(controlnet_job(detector="openpose")).to_dict()
    assert "detector_models" not in plain["controlnets"][0]  # unset: job.json as before
    again = validate_job(json.loads(validate_job(controlnet_job(detector="depth")).to_json()))
    assert again.controlnets[0].detector_models is None


@pytest.mark.parametrize(
    ("controlnet", "field", "text"),
    [
        ({"detector": "canny", "detector_models": {"pose": "a/b"}}, "detector_models", "canny"),
        (
            {"detector": "depth", "detector_models": {"pose": "a/b"}},
            "detector_models.pose",
            "depth",
        ),
        ({"detector": "depth", "detector_models": ["a/b"]}, "detector_models", "dict"),
        ({"detector": "depth", "detector_models": {"depth": ""}}, "detector_models.depth", "empty"),
        ({"detector": "depth", "detector_models": {"depth": 3}}, "detector_models.depth", "str"),
    ],
)
def test_bad_detector_weights_name_the_field(controlnet: dict, field: str, text: str) -> None:
    with pytest.raises(JobError) as info:
        validate_job(controlnet_job(**controlnet))
    assert info.value.field == f"controlnets[0].{field}" and text in str(info.value)


def test_the_controlnet_aux_detectors_are_choices_with_their_modules() -> None:
    from backend.protocol import AUX_DETECTORS, DETECTOR_MODULES, DETECTORS, MODEL_DETECTORS

    assert set(MODEL_DETECTORS) | set(AUX_DETECTORS) | {"none", "canny"} == set(DETECTORS)
    assert all(
        DETECTOR_MODULES[name] == ("controlnet_aux", "torchvision") for name in AUX_DETECTORS
    )
    assert DETECTOR_MODULES["openpose"] == ("scipy",) and "depth" not in DETECTOR_MODULES
    spec = validate_job(controlnet_job(detector="mlsd")).controlnets[0]
    assert spec.detector == "mlsd"


def test_preview_detector_requests_are_checked_like_jobs() -> None:
    from backend.protocol import QUEUED_REQUESTS, DetectorPreview, validate_detector_preview

    assert "preview_detector" in REQUESTS and "preview_detector" in QUEUED_REQUESTS
    assert "detected" in REPLIES
    line = encode_message(
        "preview_detector",
        id="p",
        control={"path": "/tmp/m.mp4", "start": 3},
        detector="depth",
        frame=2,
        width=96,
        height=64,
        allow_pickle=False,
    )
    request = validate_detector_preview(decode_message(line))
    assert request == DetectorPreview(VideoInput("/tmp/m.mp4", start=3), "depth", 2, 96, 64)
    good = {"control": "/tmp/m.mp4", "detector": "openpose", "frame": 0, "width": 64, "height": 64}
    for bad, field in [
        ({"frame": -1}, "frame"),
        ({"detector": "sobel"}, "detector"),
        ({"width": 5000}, "width"),
        ({"fit": "zoom"}, "fit"),
        ({"detector_models": {"depth": "a/b"}}, "detector_models.depth"),
        ({"colour": "red"}, "colour"),
        ({"control": {"start": 1}}, "control.path"),
    ]:
        with pytest.raises(JobError) as info:
            validate_detector_preview({**good, **bad})
        assert info.value.field == field, bad
    with pytest.raises(JobError, match="height: is required"):
        validate_detector_preview({k: v for k, v in good.items() if k != "height"})
