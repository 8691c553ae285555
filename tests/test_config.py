"""Config loading: dotted overrides, unknown keys, wrong types, impossible combinations, bad files, train.py exit."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from online_aug.config import Config, ConfigError, load_config, parse_override, save_config

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "configs" / "baseline.yaml"


def _train_module():
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- overrides


def test_dotted_overrides_apply_on_top_of_the_file() -> None:
    cfg = load_config(BASELINE, ["train.steps=7", "aug.alpha=0.5", "aug.strengths=[0.5,0.9]", "train.lr=1",
                                 "run.name=abc", "data.download=true"])
    assert cfg.train.steps == 7
    assert cfg.aug.alpha == 0.5
    assert cfg.aug.strengths == [0.5, 0.9] and all(type(s) is float for s in cfg.aug.strengths)
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float  # int is accepted where a float is expected
    assert cfg.run.name == "abc" and cfg.data.download is True
    # values from the file survive where not overridden; defaults fill the rest
    assert cfg.data.imbalance_ratio == 100 and cfg.data.many_threshold == 30 and cfg.train.batch_size == 64
    assert cfg.train.weight_decay == Config().train.weight_decay


def test_later_override_wins_and_defaults_without_file() -> None:
    cfg = load_config(None, ["train.steps=5", "train.steps=9"])
    assert cfg.train.steps == 9
    assert cfg.data.dataset == "digits" and cfg.data.imbalance_ratio == 1.0


def test_parse_override_forms() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=") == (["a", "b"], "")
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.steps")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(BASELINE, ["aug.strengths=[0.3]", "train.steps=11"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


# ---------------------------------------------------------------- unknown keys and wrong types


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.stepz=3", "train.stepz"),
        ("trian.steps=3", "trian"),
        ("aug.strenghts=[0.5]", "aug.strenghts"),
        ("train.steps.x=3", "train.steps"),  # a leaf used as a section
        ("train=3", "train"),  # a section given a scalar
    ],
)
def test_unknown_key_names_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(BASELINE, [override])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("train.steps=true", "train.steps"),  # bool is not an int
        ("train.lr=fast", "train.lr"),
        ("data.download=1", "data.download"),
        ("run.name=[a]", "run.name"),
        ("aug.strengths=0.5", "aug.strengths"),  # a scalar where a list is expected
        ("aug.strengths=[0.5,x]", "aug.strengths[1]"),
        ("aug.schedule=fast", "aug.schedule"),  # not one of the Literal choices
        ("data.dataset=mnist", "data.dataset"),
    ],
)
def test_wrong_type_names_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(BASELINE, [override])


def test_unknown_key_in_the_file_names_it(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: 3\n  stepz: 4\n")
    with pytest.raises(ConfigError, match=re.escape("train.stepz")):
        load_config(p)


# ---------------------------------------------------------------- impossible combinations


def _cfg(*overrides: str) -> Config:
    cfg = Config()
    for text in overrides:
        keys, value = parse_override(text)
        obj = cfg
        for k in keys[:-1]:
            obj = getattr(obj, k)
        setattr(obj, keys[-1], value)
    return cfg


def test_defaults_are_valid_on_cpu_and_cuda() -> None:
    Config().validate(cuda_available=False)
    Config().validate(cuda_available=True)


def test_fp16_needs_cuda() -> None:
    cfg = _cfg("train.precision=fp16")
    with pytest.raises(ConfigError, match=re.escape("train.precision")):
        cfg.validate(cuda_available=False)
    cfg.validate(cuda_available=True)  # fine where CUDA is present
    with pytest.raises(ConfigError, match=re.escape("train.precision")):
        _cfg("train.precision=fp16", "run.device=cpu").validate(cuda_available=True)


def test_generator_fp16_needs_cuda_when_augmenting() -> None:
    with pytest.raises(ConfigError, match=re.escape("aug.dtype")):
        _cfg("aug.dtype=fp16", "aug.alpha=0.5").validate(cuda_available=False)
    _cfg("aug.dtype=fp16", "aug.alpha=0.0").validate(cuda_available=False)  # generator unused: no error


def test_device_cuda_without_cuda() -> None:
    with pytest.raises(ConfigError, match=re.escape("run.device")):
        _cfg("run.device=cuda").validate(cuda_available=False)


@pytest.mark.parametrize(
    ("overrides", "world", "named"),
    [
        (("train.batch_size=64", "train.micro_batch_size=24"), 1, "train.micro_batch_size"),
        (("train.batch_size=64", "train.micro_batch_size=12"), 2, "train.micro_batch_size"),  # per-rank 32
        (("train.batch_size=63",), 2, "train.batch_size"),
    ],
)
def test_batch_divisibility(overrides: tuple[str, ...], world: int, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        _cfg(*overrides).validate(cuda_available=False, world_size=world)


def test_micro_batch_that_divides_is_accepted() -> None:
    _cfg("train.batch_size=64", "train.micro_batch_size=16").validate(cuda_available=False, world_size=2)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval(alpha: float) -> None:
    with pytest.raises(ConfigError, match=re.escape("aug.alpha")):
        _cfg(f"aug.alpha={alpha}").validate(cuda_available=False)
    with pytest.raises(ConfigError, match=re.escape("aug.alpha")):
        load_config(BASELINE, [f"aug.alpha={alpha}"])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_bounds_are_allowed(alpha: float) -> None:
    _cfg(f"aug.alpha={alpha}").validate(cuda_available=False)


def test_imbalance_ratio_below_one() -> None:
    with pytest.raises(ConfigError, match=re.escape("data.imbalance_ratio")):
        load_config(BASELINE, ["data.imbalance_ratio=0.5"])


def test_grid_mode_with_zero_denoising_steps() -> None:
    # int(N * s) = int(4 * 0.2) = 0 steps for the smallest strength
    bad = ("aug.alpha=0.5", "aug.schedule=grid", "aug.grid_steps=4", "aug.strengths=[0.2, 0.9]")
    with pytest.raises(ConfigError, match=re.escape("aug.grid_steps")):
        _cfg(*bad).validate(cuda_available=False)
    with pytest.raises(ConfigError, match=re.escape("aug.grid_steps")):
        _cfg("aug.alpha=0.5", "aug.schedule=grid", "aug.grid_steps=4",
             "aug.strength_range=[0.1, 0.9]").validate(cuda_available=False)
    _cfg("aug.alpha=0.5", "aug.schedule=grid", "aug.grid_steps=5",
         "aug.strengths=[0.2, 0.9]").validate(cuda_available=False)  # int(5 * 0.2) = 1 step is enough


@pytest.mark.parametrize("k", [0, -1])
def test_fewstep_k_below_one(k: int) -> None:
    with pytest.raises(ConfigError, match=re.escape("aug.steps")):
        load_config(BASELINE, [f"aug.steps={k}"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("aug.strengths=[0.0]", "aug.strengths"),
        ("aug.strengths=[1.2]", "aug.strengths"),
        ("aug.strength_range=[0.9, 0.5]", "aug.strength_range"),
        ("data.test_fraction=1.0", "data.test_fraction"),
        ("train.steps=0", "train.steps"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("data.image_size=4", "data.image_size"),
        ("aug.queue_depth=0", "aug.queue_depth"),
    ],
)
def test_other_out_of_range_values(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(BASELINE, [override])


# ---------------------------------------------------------------- files


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing)


def test_unreadable_yaml_is_named(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("train: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(str(p))):
        load_config(p)


def test_yaml_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=re.escape(str(p))):
        load_config(p)


# ---------------------------------------------------------------- the entry point


def test_train_py_bad_key_exits_2_with_message(capsys: pytest.CaptureFixture[str]) -> None:
    main = _train_module().main
    assert main(["--config", str(BASELINE), "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "config error" in err


def test_train_py_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = _train_module().main
    missing = tmp_path / "missing.yaml"
    assert main(["--config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "world", "named"),
    [
        (("train.batch_size=63",), 2, "train.batch_size"),
        (("train.batch_size=48", "train.micro_batch_size=16"), 2, "train.micro_batch_size"),  # per-rank 24
        (("train.batch_size=64", "train.mixup_alpha=0.2"), 64, "Mixup"),  # per-rank micro-batch of 1
    ],
)
def test_world_size_checks_happen_at_launch(overrides: tuple[str, ...], world: int, named: str) -> None:
    """load_config knows no world size; the per-rank split is checked again once the launcher has set it."""
    cfg = load_config(BASELINE, list(overrides))  # valid for one process
    with pytest.raises(ConfigError, match=re.escape(named)):
        cfg.train.check_world_size(world)  # what Trainer.__init__ calls after init_distributed


def test_validation_runs_once_per_load_and_not_again_in_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config validates once; resolving the device, precision and batch split re-checks nothing."""
    from online_aug import distributed

    calls = []
    real = Config.validate
    monkeypatch.setattr(Config, "validate", lambda self, **kw: (calls.append(kw), real(self, **kw))[1])
    cfg = load_config(BASELINE, ["train.batch_size=64", "train.micro_batch_size=8", "run.device=cpu"])
    assert len(calls) == 1
    assert distributed.micro_batch(cfg, 2) == (8, 4)
    assert distributed.resolve_device(cfg).type == "cpu"
    assert distributed.resolve_precision(cfg, distributed.resolve_device(cfg)) == "fp32"
    distributed.deepspeed_config(cfg, 2, "fp32")
    assert len(calls) == 1


def test_each_section_checks_its_own_keys() -> None:
    from online_aug.config import AugConfig, DataConfig, ModelConfig, RunConfig, TrainConfig

    for section, key in [(RunConfig(name=""), "run.name"), (DataConfig(num_workers=-1), "data.num_workers"),
                         (ModelConfig(drop_rate=1.0), "model.drop_rate"),
                         (TrainConfig(eval_every=0), "train.eval_every"), (AugConfig(grid_steps=0), "aug.grid_steps")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            section.validate()
    TrainConfig(batch_size=64).validate(world_size=4)
    with pytest.raises(ConfigError, match=re.escape("train.batch_size")):
        TrainConfig(batch_size=64).validate(world_size=3)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        # these crashed (ZeroDivisionError after DeepSpeed started) or were accepted before
        ("train.batch_size=0", "train.batch_size"),
        ("train.eval_every=0", "train.eval_every"),
        ("train.log_every=0", "train.log_every"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.ckpt_every=-1", "train.ckpt_every"),
        ("train.keep_last=0", "train.keep_last"),
        ("train.eval_batch_size=0", "train.eval_batch_size"),
        ("train.micro_batch_size=-8", "train.micro_batch_size"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-0.1", "train.lr"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.min_lr_ratio=-0.1", "train.min_lr_ratio"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
        ("train.cmo_prob=1.5", "train.cmo_prob"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.split_seed=-1", "data.split_seed"),
        ("data.class_order_seed=-2", "data.class_order_seed"),
        ("data.few_threshold=-1", "data.few_threshold"),
        ("data.root=", "data.root"),
        ("run.seed=-1", "run.seed"),
        ("run.name=", "run.name"),
        ("run.name=a/b", "run.name"),
        ("run.out_dir=", "run.out_dir"),
        ("model.name=", "model.name"),
        ("model.drop_rate=1", "model.drop_rate"),
        ("model.drop_rate=-0.1", "model.drop_rate"),
        ("aug.grid_steps=0", "aug.grid_steps"),
        ("aug.image_every=-1", "aug.image_every"),
        ("aug.resolution=-8", "aug.resolution"),
        ("aug.guidance_scale=-1", "aug.guidance_scale"),
        ("aug.beta=-1", "aug.beta"),
    ],
)
def test_bad_numbers_are_config_errors(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)) as info:
        load_config(BASELINE, [override])
    assert str(info.value).startswith(named) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("aug.alpha=0.5", "aug.model="), "aug.model"),
        (("aug.alpha=0.5", "aug.filter_fraction=0.2", "aug.filter_metaclass="), "aug.filter_metaclass"),
    ],
)
def test_empty_generator_names_when_augmenting(overrides: tuple[str, ...], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(BASELINE, list(overrides))
    load_config(BASELINE, [o for o in overrides if not o.startswith("aug.alpha")])  # alpha 0: generator unused


@pytest.mark.parametrize("values", [("train.warmup_steps=0", "train.ckpt_every=0", "train.micro_batch_size=0",
                                     "train.grad_clip=0", "train.min_lr_ratio=0", "train.min_lr_ratio=1",
                                     "aug.image_every=0", "aug.resolution=0", "aug.guidance_scale=0",
                                     "data.class_order_seed=-1", "model.drop_rate=0.5", "train.keep_last=1")])
def test_boundary_values_are_accepted(values: tuple[str, ...]) -> None:
    for v in values:
        load_config(BASELINE, [v])


def test_train_py_zero_batch_exits_2_before_heavy_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = _train_module().main
    out = tmp_path / "runs"
    assert main(["--config", str(BASELINE), "train.batch_size=0", f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: train.batch_size") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "configs/demo.yaml", "run.name=x", "--resume", "latest", "train.steps=20"],
        ["run.name=x", "--config", "configs/demo.yaml", "train.steps=20", "--resume", "latest"],
        ["--resume", "latest", "run.name=x", "train.steps=20", "--config", "configs/demo.yaml"],
        ["--local_rank=0", "run.name=x", "--config", "configs/demo.yaml", "--resume", "latest", "train.steps=20"],
    ],
)
def test_options_and_overrides_mix_in_any_order(argv: list[str]) -> None:
    args = _train_module().parse_args(argv)
    assert args.config == "configs/demo.yaml" and args.resume == "latest"
    assert args.overrides == ["run.name=x", "train.steps=20"]


def test_micro_batch_and_accumulation() -> None:
    from online_aug.distributed import deepspeed_config, micro_batch

    cfg = load_config(BASELINE, ["train.batch_size=64", "train.micro_batch_size=8"])
    assert micro_batch(cfg, 2) == (8, 4)
    assert micro_batch(load_config(BASELINE, ["train.batch_size=64"]), 4) == (16, 1)
    ds = deepspeed_config(cfg, 2, "fp32")
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 0
    assert "fp16" not in ds and "bf16" not in ds
    assert deepspeed_config(load_config(BASELINE, ["train.zero_stage=3"]), 1, "bf16")["bf16"] == {"enabled": True}
