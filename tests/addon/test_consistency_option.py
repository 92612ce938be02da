"""The panel's Consistency option (issue 21): in the settings, in built and rebuilt jobs."""

import pytest

from blender_t2vz import jobs

BASE = {"prompt": "snow", "width": 64, "height": 64, "steps": 3}
VIDEO = {"path": "/clips/a.mp4"}


def build(mode: str, **settings):
    fields = {**BASE, "mode": mode, **settings}
    extra = {"video": VIDEO} if mode == "pix2pix" else {}
    return jobs.build_job(
        fields, out="/tmp/o", fps=24, defaults={"model": "m", "pix2pix_model": "p"},
        source_frames=4, **extra,
    )  # fmt: skip


def test_the_panel_offers_consistency_defaulting_to_the_paper(scene) -> None:
    settings = scene.t2vz
    assert settings.consistency == "paper"
    assert settings.to_values(scene)["consistency"] == "paper"
    settings.consistency = "flow"
    assert settings.to_values(scene)["consistency"] == "flow"
    items = settings.bl_rna.properties["consistency"].enum_items
    assert [i.identifier for i in items] == ["paper", "flow"]
    assert all(i.description for i in items)  # each says what it does (the tooltip)


def test_jobs_carry_the_choice_where_the_backend_takes_it() -> None:
    assert build("pix2pix", consistency="flow")["consistency"] == "flow"
    assert build("pix2pix")["consistency"] == "paper"
    # text2video has no input video to follow: always the paper's (the backend refuses flow)
    assert build("text2video", consistency="flow")["consistency"] == "paper"
    stored = build("pix2pix")
    assert jobs.rebuild_job(stored, {"consistency": "flow"}, out="/tmp/n")["consistency"] == "flow"
    t2v = build("text2video")
    assert jobs.rebuild_job(t2v, {"consistency": "flow"}, out="/tmp/n")["consistency"] == "paper"


def test_bad_choice_is_refused_by_the_property(scene) -> None:
    with pytest.raises(TypeError):
        scene.t2vz.consistency = "rerender"
    assert scene.t2vz.consistency == "paper"
