"""tools/planted_bugs.py: the plants still match the code, and a plant is really applied."""

from __future__ import annotations

import pytest

from tools import planted_bugs


@pytest.mark.parametrize("plant", planted_bugs.PLANTS, ids=lambda p: p.test.split("::")[1])
def test_each_plant_applies_once_and_its_test_exists(plant: planted_bugs.Plant) -> None:
    """If the code moves on, the plant must be updated rather than silently skipped."""
    source = (planted_bugs.ROOT / plant.path).read_text(encoding="utf-8")
    planted = planted_bugs.planted_source(plant, source)
    assert planted != source and plant.new in planted
    test_file, test_name = plant.test.split("::")
    assert f"def {test_name}(" in (planted_bugs.ROOT / test_file).read_text(encoding="utf-8")


def test_a_plant_whose_text_is_gone_is_refused() -> None:
    plant = planted_bugs.PLANTS[0]
    with pytest.raises(ValueError, match="occurs 0 times in backend/engine/pipeline.py"):
        planted_bugs.planted_source(plant, "nothing here")
    with pytest.raises(ValueError, match="occurs 2 times"):
        planted_bugs.planted_source(plant, plant.old + plant.old)
