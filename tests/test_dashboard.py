"""TensorBoard opens on a dashboard: every run writes a custom-scalars layout and an HParams session, read back here
with TensorBoard's own readers (the event accumulator, and the custom_scalars and hparams plugins' backends over a
logdir of runs, as ``tensorboard --logdir`` serves them).

Three short real trainings (the pattern of test_train_run.py): an augmented run (tiny SD), a baseline run, and that
baseline resumed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import data_provider, event_file_loader, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.context import RequestContext
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import custom_scalars_plugin, layout_pb2
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups
from tensorboard.plugins.hparams import metadata as hp_metadata
from test_train_run import OVERRIDES, _train
from tiny_sd import save_tiny_sd

from online_aug.config import AugConfig
from online_aug.monitor import FINAL_METRICS, GUARD_TAGS, HPARAM_KEYS

LAYOUT_TAG = "custom_scalars__config__"
# The guard's scalars as it documents them (docs/guard.md): what the guard regexes must match when the run has none
GUARD_NAMES = ("aug/guard/classes_on", "aug/guard/edit_share", "aug/guard/on/four")


def _aug_keys(*overrides: str) -> list[str]:
    """The overrides whose aug.* key this version of the config has (the guard's keys are new)."""
    return [o for o in overrides if hasattr(AugConfig(), o.split("=")[0].removeprefix("aug."))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, clean_env: dict[str, str]) -> dict[str, Path]:
    """One logdir as the benchmark has: an augmented run and a baseline run, the baseline resumed to more steps."""
    out = tmp_path_factory.mktemp("runs")
    sd = save_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")
    # guard off and a small audit: the tiny SD draws nothing, and the edits (aug/near_dup, ...) must still be made;
    # the audit's aug/guard/* scalars are written either way
    _train(["--config", "configs/baseline.yaml", "run.name=aug", "train.steps=4", *OVERRIDES, f"run.out_dir={out}",
            "aug.alpha=0.5", f"aug.model={sd}", "aug.steps=2", "aug.image_every=0",
            *_aug_keys("aug.guard=off", "aug.audit_edits=2")], clean_env)
    _train(["--config", "configs/baseline.yaml", "run.name=ce", "train.steps=2", *OVERRIDES, f"run.out_dir={out}"],
           clean_env)
    (ce,) = out.glob("*-ce")
    _train(["--resume", str(ce), "train.steps=4"], clean_env)
    (aug,) = out.glob("*-aug")
    return {"logdir": out, "aug": aug, "ce": ce}


def _accumulator(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layout(acc: EventAccumulator) -> layout_pb2.Layout:
    (event,) = acc.Tensors(LAYOUT_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return layout


def _chart_tags(layout: layout_pb2.Layout) -> dict[str, list[str]]:
    return {f"{cat.title}/{chart.title}": list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}


# ---------------------------------------------------------------- custom scalars


def test_layout_names_tags_the_run_writes(runs: dict[str, Path]) -> None:
    acc = _accumulator(runs["aug"])
    assert LAYOUT_TAG in acc.PluginTagToContent("custom_scalars")
    layout = _layout(acc)
    assert [c.title for c in layout.category] == ["accuracy", "training", "augmentation health"]
    charts = _chart_tags(layout)
    assert charts["accuracy/many / medium / few-shot accuracy"] == ["eval/acc_many", "eval/acc_medium", "eval/acc_few"]
    assert set(charts["training/loss"] + charts["training/learning rate"]) == {"train/loss", "train/lr"}
    scalars = set(acc.Tags()["scalars"])
    guard_tags = {t for t in scalars if t.startswith("aug/guard/")}
    for chart, tags in charts.items():
        assert tags, chart
        for tag in tags:
            # TensorBoard's own matching: a chart's tag is a regex, re.match against the run's scalar tags
            if tag in GUARD_TAGS and not guard_tags:  # no guard in this version of the trainer
                assert any(re.match(tag, name) for name in GUARD_NAMES), (chart, tag)
                continue
            assert any(re.match(tag, name) for name in scalars), f"{chart}: {tag} matches none of {sorted(scalars)}"
    if guard_tags:  # every guard scalar is on a guard chart
        assert all(any(re.match(g, t) for g in GUARD_TAGS) for t in guard_tags), guard_tags


def test_run_without_augmentation_has_no_augmentation_category(runs: dict[str, Path]) -> None:
    layout = _layout(_accumulator(runs["ce"]))
    assert [c.title for c in layout.category] == ["accuracy", "training"]


def test_custom_scalars_plugin_serves_the_merged_layout(runs: dict[str, Path]) -> None:
    """TensorBoard merges the runs' layouts by category: the logdir of both runs has all three, each once."""
    context = _tb_context(runs["logdir"])
    # TensorBoard shows a plugin's tab when the data provider lists it
    assert {"custom_scalars", "hparams", "scalars"} <= set(context.data_provider.list_plugins(RequestContext(),
                                                                                              experiment_id=""))
    plugin = custom_scalars_plugin.CustomScalarsPlugin(context)
    served = json.loads(plugin.layout_impl(RequestContext(), ""))  # the /layout route's JSON body
    titles = [c["title"] for c in served["category"]]
    assert titles == ["accuracy", "training", "augmentation health"]
    accuracy = next(c for c in served["category"] if c["title"] == "accuracy")
    assert len(accuracy["chart"]) == 2  # the two runs' identical charts are not repeated


# ---------------------------------------------------------------- hparams


def test_session_start_holds_the_config_and_declares_the_final_metrics(runs: dict[str, Path]) -> None:
    acc = _accumulator(runs["aug"])
    content = acc.PluginTagToContent("hparams")
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}  # a protobuf Value: one kind set
    assert hp["aug.alpha"] == 0.5 and hp["train.steps"] == 4 and hp["train.lr"] == pytest.approx(2e-3)
    assert hp["model.name"] == "test_resnet" and hp["run.name"] == "aug" and hp["data.imbalance_ratio"] == 100
    assert hp["aug.strengths"] == "0.5,0.7,0.9" and hp["aug.adaptive"] == "false"
    assert set(hp) <= set(HPARAM_KEYS)
    if hasattr(AugConfig(), "guard"):
        assert hp["aug.guard"] == "off"
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == [f"final/{k}" for k in FINAL_METRICS]
    assert {h.name for h in experiment.hparam_infos} == set(hp)
    end = hp_metadata.parse_session_end_info_plugin_data(content[hp_metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS


def test_final_metrics_are_the_final_evaluation(runs: dict[str, Path]) -> None:
    acc = _accumulator(runs["aug"])
    for k in FINAL_METRICS:
        final = acc.Scalars(f"final/{k}")
        assert [e.step for e in final] == [4]
        assert final[0].value == pytest.approx(acc.Scalars(f"eval/{k}")[-1].value)  # select=last: the last eval


def test_resumed_run_keeps_one_session_start_and_layout(runs: dict[str, Path]) -> None:
    files = sorted((runs["ce"] / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 2  # the first leg's and the resumed leg's
    counts = {LAYOUT_TAG: 0, hp_metadata.SESSION_START_INFO_TAG: 0, hp_metadata.EXPERIMENT_TAG: 0}
    for f in files:
        for event in event_file_loader.EventFileLoader(str(f)).Load():
            for value in event.summary.value:
                if value.tag in counts:
                    counts[value.tag] += 1
    assert counts == dict.fromkeys(counts, 1), counts
    acc = _accumulator(runs["ce"])
    # the session start is the run's first leg's (train.steps=2); the final metrics are those of the end (step 4)
    start = hp_metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")[hp_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["train.steps"].number_value == 2
    assert [e.step for e in acc.Scalars("final/top1")] == [2, 4]


def test_hparams_plugin_lists_both_runs_with_their_final_metrics(runs: dict[str, Path]) -> None:
    """What the HParams tab shows for ``tensorboard --logdir <runs>``: one row per run, its config and metrics."""
    context = backend_context.Context(_tb_context(runs["logdir"]))
    statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING]
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=statuses)
    response = list_session_groups.Handler(RequestContext(), context, "", request).run()
    rows = {g.hparams["run.name"].string_value: g for g in response.session_groups}
    assert set(rows) == {"aug", "ce"}
    for name, group in rows.items():
        assert group.hparams["model.name"].string_value == "test_resnet"
        values = {m.name.tag: m.value for m in group.metric_values}
        assert set(values) >= {"final/top1", "final/balanced_acc"}, (name, values)
        assert all(0.0 <= v <= 1.0 or math.isnan(v) for v in values.values())
        step = {m.name.tag: m.training_step for m in group.metric_values}["final/top1"]
        assert step == 4  # the resumed run's row shows where it ended, not its first leg
        assert group.sessions[0].status == api_pb2.STATUS_SUCCESS
    assert rows["aug"].hparams["aug.alpha"].number_value == 0.5 and rows["ce"].hparams["aug.alpha"].number_value == 0


def _tb_context(logdir: Path) -> base_plugin.TBContext:
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    return base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
