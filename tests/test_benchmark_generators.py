"""The long-tail benchmark's committed generators say exactly what they saw (build_info.json / manifest.json), and
what they saw is allowed: pool or the classifier's long-tail subset, never a validation or test image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from online_aug.config import load_config
from online_aug.data import build_splits, check_generator_folders

ROOT = Path(__file__).resolve().parents[1]
# folder -> the split part it was trained on
GENERATORS = {"tiny-sd-digits-pool": "pool", "tiny-sd-digits-pool-agnostic": "pool",
              "tiny-sd-digits-lt100": "train"}


@pytest.fixture(scope="module")
def splits():
    return build_splits(load_config(ROOT / "configs" / "demo.yaml").data)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_build_info_records_the_part_and_its_images(name: str, splits) -> None:
    folder = ROOT / "models" / name
    if not (folder / "build_info.json").is_file():
        pytest.skip(f"models/{name} is not built yet (tools/build_longtail_generators.sh)")
    data = json.loads((folder / "build_info.json").read_text())["data"]
    part = GENERATORS[name]
    assert data["part"] == part and data["dataset"] == "digits"
    expected = getattr(splits, part)
    assert data["indices"] == sorted(expected.index.tolist())  # exactly that part, nothing else
    assert data["class_counts"] == expected.class_counts() and min(data["class_counts"]) >= 1
    assert not set(data["indices"]) & set(splits.test.index.tolist())
    assert not set(data["indices"]) & set(splits.val.index.tolist())
    check_generator_folders([str(folder)], splits)  # what the trainer runs before building anything


def test_class_agnostic_pool_model_never_saw_a_class_name() -> None:
    info = json.loads((ROOT / "models" / "tiny-sd-digits-pool-agnostic" / "build_info.json").read_text())
    assert info["prompt_template"] == "a photo" and "{name}" not in info["prompt_template"]
    vocab = json.loads((ROOT / "models" / "tiny-sd-digits-pool-agnostic" / "tokenizer" / "vocab.json").read_text())
    for name in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"):
        assert f"{name}</w>" not in vocab  # no class name is a word of its tokenizer
