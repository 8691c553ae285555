"""Long-tail classification metrics on hand-built examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from online_aug.metrics import classification_metrics, fmt, shot_groups
from online_aug.monitor import eval_table

# class 0: 150 training images (many), class 1: 50 (medium), class 2: 5 (few); thresholds many > 100, few < 20
COUNTS = [150, 50, 5]
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2])
PREDS = np.array([0, 0, 0, 1, 1, 0, 2, 0])  # class accuracies 3/4, 1/2, 1/2


def test_shot_groups_boundaries() -> None:
    assert shot_groups(COUNTS, 100, 20) == {"many": [0], "medium": [1], "few": [2]}
    # exactly at a threshold is medium: many is strictly above, few strictly below
    assert shot_groups([100, 20, 101, 19], 100, 20) == {"many": [2], "medium": [0, 1], "few": [3]}


def test_hand_built_example() -> None:
    m = classification_metrics(PREDS, LABELS, COUNTS, 100, 20)
    assert m["top1"] == pytest.approx(5 / 8)
    assert m["balanced_acc"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    assert m["class_acc/0"] == pytest.approx(3 / 4)
    assert m["class_acc/1"] == pytest.approx(1 / 2)
    assert m["class_acc/2"] == pytest.approx(1 / 2)
    assert m["acc_many"] == pytest.approx(3 / 4)
    assert m["acc_medium"] == pytest.approx(1 / 2)
    assert m["acc_few"] == pytest.approx(1 / 2)


def test_group_accuracy_is_mean_of_class_accuracies_not_pooled() -> None:
    # two few-shot classes with very different test sizes: class 1 has 1 image (right), class 2 has 3 (all wrong)
    labels = np.array([0, 1, 2, 2, 2])
    preds = np.array([0, 1, 0, 0, 0])
    m = classification_metrics(preds, labels, [150, 5, 5], 100, 20)
    assert m["acc_few"] == pytest.approx(0.5)  # pooled would be 1/4
    assert m["top1"] == pytest.approx(2 / 5)
    assert m["balanced_acc"] == pytest.approx((1 + 1 + 0) / 3)


def test_empty_group_is_nan_not_an_error() -> None:
    m = classification_metrics(PREDS, LABELS, COUNTS, 1000, 20)  # nothing has > 1000 images
    assert math.isnan(m["acc_many"])
    assert m["acc_medium"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["acc_few"] == pytest.approx(1 / 2)
    m = classification_metrics(PREDS, LABELS, COUNTS, 100, 1)  # nothing has < 1 image
    assert math.isnan(m["acc_few"])
    assert fmt(m["acc_few"]) == "n/a"
    table = eval_table(m, ["a", "b", "c"], COUNTS)
    assert "n/a" in table and "acc_few" in table


def test_class_absent_from_eval_set_is_nan_and_left_out() -> None:
    labels = np.array([0, 0, 1])
    preds = np.array([0, 1, 1])
    m = classification_metrics(preds, labels, COUNTS, 100, 20)  # class 2 (the only few class) has no test image
    assert math.isnan(m["class_acc/2"])
    assert math.isnan(m["acc_few"])
    assert m["balanced_acc"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["top1"] == pytest.approx(2 / 3)


def test_empty_eval_set() -> None:
    m = classification_metrics(np.array([], dtype=int), np.array([], dtype=int), COUNTS, 100, 20)
    assert all(math.isnan(v) for v in m.values())


def test_fmt() -> None:
    assert fmt(0.5) == "50.00"
    assert fmt(float("nan")) == "n/a"


def test_reference_column_is_the_mean_of_a_compare_row(tmp_path) -> None:
    from online_aug.monitor import eval_table, load_reference

    csv_path = tmp_path / "results.csv"
    csv_path.write_text("preset,seed,split,steps,top1,balanced_acc,acc_many,acc_medium,acc_few,wall_s,run_dir\n"
                        "CE,0,test,300,70.0,69.0,100.0,99.0,50.0,1,x\n"
                        "CE,1,test,300,72.0,71.0,100.0,97.0,54.0,1,y\n"
                        "Diff-Mix,0,test,300,80.0,79.0,100.0,99.0,70.0,1,z\n")
    label, ref = load_reference(f"{csv_path}:CE")
    assert label == "CE (2 seeds)" and ref["top1"] == 71.0 and ref["acc_few"] == 52.0
    table = eval_table({"top1": 0.9, "balanced_acc": 0.9, "acc_few": 0.8}, ["a"], [3], (label, ref))
    top = next(line for line in table.splitlines() if line.startswith("top1"))
    assert top.split()[1:] == ["90.00", "71.00"]
    assert load_reference(f"{csv_path}:nope") is None and load_reference(f"{tmp_path}/absent.csv:CE") is None
