"""aug.lora as a stack: several LoRAs, each at its weight, merged as diffusers' adapters (``load_lora_weights(...,
adapter_name=...)`` + ``set_adapters``) would run them, e.g. the public LCM-LoRA on a user's fine-tuned LoRA; the
one-string form keeps today's numbers bit for bit; every entry is checked (syntax, folder, base model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from tiny_sd import save_tiny_sd

from online_aug.config import AugConfig, ConfigError, LoraEntry, load_config, lora_entries
from online_aug.experiments.cache import generator_fingerprint
from online_aug.generator import SDEditGenerator, load_sd
from online_aug.generator.finetuned import LORA_FILE, apply_finetuned, base_identity, save_lora, write_manifest
from online_aug.generator.preflight import check_generator_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
NAMES = [str(i) for i in range(10)]


def _make_lora(base: Path, folder: Path, seed: int, rank: int, targets: list[str]) -> Path:
    """A LoRA of the tiny SD's UNet with random (non-zero) weights, saved as tools/finetune_sd.py saves one."""
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    folder.mkdir(parents=True)
    save_lora(folder, unet, config)
    return folder


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stack")
    base = save_tiny_sd(root / "sd")
    return {"base": base,
            "a": _make_lora(base, root / "lora-a", seed=1, rank=2, targets=["to_q", "to_k", "to_v", "to_out.0"]),
            # other rank, some of the same modules (save_lora writes attention projections in diffusers' old
            # format; mixing in other modules would make diffusers read the file in another, dropping those)
            "b": _make_lora(base, root / "lora-b", seed=2, rank=4, targets=["to_k", "to_v", "to_out.0"])}


def _unet_out(unet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 32, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 20]), encoder_hidden_states=emb).sample


def _ours(sd: dict[str, Path], lora: str | list[str], **kw) -> torch.nn.Module:
    comps = load_sd(str(sd["base"]), CPU, torch.float32)
    assert apply_finetuned(comps, AugConfig(model=str(sd["base"]), lora=lora, **kw), 10) is None
    assert not any("lora" in n for n, _ in comps.unet.named_parameters())  # merged: a plain UNet runs
    assert not any(p.requires_grad for p in comps.unet.parameters())
    return comps.unet


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' pipeline, with two adapters
def test_a_weighted_stack_is_what_diffusers_set_adapters_runs(sd):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd["base"], safety_checker=None)
    pipe.load_lora_weights(str(sd["a"]), adapter_name="a")
    pipe.load_lora_weights(str(sd["b"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.3])
    ref = _unet_out(pipe.unet)
    got = _unet_out(_ours(sd, [f"{sd['a']}:0.7", f"{sd['b']}:1.3"]))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # ours is fused, diffusers' is not: rounding only
    plain = _unet_out(load_sd(str(sd["base"]), CPU, torch.float32).unet)
    for alone in (_ours(sd, f"{sd['a']}:0.7"), _ours(sd, f"{sd['b']}:1.3")):  # both LoRAs count
        assert (got - _unet_out(alone)).abs().max() > 1e-3
    assert (got - plain).abs().max() > 1e-3


def test_weight_zero_for_the_second_is_the_first_alone(sd):
    alone = _ours(sd, str(sd["a"]))
    stacked = _ours(sd, [str(sd["a"]), f"{sd['b']}:0"])
    assert all(torch.equal(v, stacked.state_dict()[k]) for k, v in alone.state_dict().items())


def test_an_entry_without_a_weight_gets_lora_scale(sd):
    a = _unet_out(_ours(sd, [str(sd["a"]), str(sd["b"])], lora_scale=0.5))
    b = _unet_out(_ours(sd, [f"{sd['a']}:0.5", f"{sd['b']}:0.5"]))
    assert torch.equal(a, b)


@pytest.mark.skipif(not (ROOT / "models" / "ft-digits-pool-agnostic" / LORA_FILE).is_file(),
                    reason="the committed fine-tuned tiny SD is not here")
def test_the_one_lora_forms_are_todays_numbers_bit_for_bit(monkeypatch):
    """aug.lora: <folder> (weight aug.lora_scale), [<folder>] and <folder>:<w> merge exactly the same weights."""
    monkeypatch.chdir(ROOT)
    ft = "models/ft-digits-pool-agnostic"

    def unet(lora, scale=1.0):
        aug = load_config(ROOT / "configs" / "diff-mix.yaml", [f"aug.lora_scale={scale}"]).aug
        aug.lora = lora
        comps = load_sd(aug.model, CPU, torch.float32)
        apply_finetuned(comps, aug, 10)
        return comps.unet.state_dict()

    for scale in (1.0, 0.6):
        ref = unet(ft, scale)
        for form in ([ft], f"{ft}:{scale}", [f"{ft}:{scale}"]):
            got = unet(form, 1.0 if ":" in str(form) else scale)
            assert all(torch.equal(v, got[k]) for k, v in ref.items()), form


# ---------------------------------------------------------------- bad entries: one line naming aug.lora and the fix


def test_entry_syntax():
    assert lora_entries("", 0.5) == [] and lora_entries([], 0.5) == []
    assert lora_entries("models/x", 0.5) == [LoraEntry("models/x", 0.5, "aug.lora")]
    assert lora_entries(["models/x", "org/lcm:1.0"], 0.5) == [LoraEntry("models/x", 0.5, "aug.lora[0]"),
                                                                LoraEntry("org/lcm", 1.0, "aug.lora[1]")]
    assert load_config(None, ["aug.lora=[models/x, org/lcm:-0.25]"]).aug.lora == ["models/x", "org/lcm:-0.25"]


@pytest.mark.parametrize(("value", "match"), [
    ("[models/x, models/y:abc]", r"aug\.lora\[1\]='models/y:abc': write a LoRA as 'path' or 'path:weight' with a "
                                 r"number after the last ':' \(e\.g\. models/y:0\.5\)"),
    ("models/y:inf", r"aug\.lora='models/y:inf': write a LoRA as 'path' or 'path:weight'"),
    ("[':1']", r"aug\.lora\[0\]=':1': write a LoRA as"),
    ("[models/x, '  ']", r"aug\.lora\[1\] is empty; give a LoRA folder or hub id"),
    ("[models/x, models/x:2]", r"aug\.lora\[1\]='models/x' is listed twice in aug\.lora \(also aug\.lora\[0\]\); "
                               r"keep one entry"),
])
def test_a_bad_entry_is_a_one_line_config_error(value, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [f"aug.lora={value}"])
    assert "\n" not in str(e.value)


def test_a_missing_folder_is_named_by_preflight_and_by_the_loader(sd, tmp_path):
    missing = tmp_path / "nope"
    aug = AugConfig(alpha=0.5, model=str(sd["base"]), prompt="a photo of a {name}", lora=[str(sd["a"]), str(missing)])
    with pytest.raises(ConfigError, match=rf"^aug\.lora\[1\]='{missing}': no such folder; point it at a folder "
                                          r"written by tools/finetune_sd.py") as e:
        check_generator_inputs(aug, 10)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=rf"^aug\.lora\[1\]='{missing}': no such folder"):
        SDEditGenerator.from_config(aug, NAMES, CPU)


def test_a_hub_id_is_left_to_the_loader_which_names_the_entry(sd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    aug = AugConfig(alpha=0.5, model=str(sd["base"]), prompt="a photo of a {name}",
                    lora=[str(sd["a"]), "no-such-org/no-such-lora:1.0"])
    check_generator_inputs(aug, 10)  # a hub id: nothing to check without the network
    with pytest.raises(ConfigError, match=r"^aug\.lora\[1\]='no-such-org/no-such-lora': no LoRA could be loaded from "
                                          r"the Hugging Face hub id .*HF_HUB_OFFLINE=1"):
        SDEditGenerator.from_config(aug, NAMES, CPU)


def test_every_lora_of_the_stack_must_fit_the_base_model(sd, tmp_path):
    """Weights for another base model stay errors, whichever entry carries them, before anything is loaded."""
    other = load_sd(str(save_tiny_sd(tmp_path / "other-sd", seed=3)), CPU, torch.float32)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / LORA_FILE).write_bytes((sd["b"] / LORA_FILE).read_bytes())
    write_manifest(foreign, {"base_model": "other-sd", "base": base_identity(other), "num_classes": 10})
    aug = AugConfig(model=str(sd["base"]), prompt="a photo of a {name}", lora=[str(sd["a"]), str(foreign)])
    with pytest.raises(ConfigError, match=r"^aug\.lora\[1\]: .*manifest\.json was learned on a different base model "
                                          r"\('other-sd'\); differs in weights"):
        SDEditGenerator.from_config(aug, NAMES, CPU)

    wide = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    comps = load_sd(str(sd["base"]), CPU, torch.float32)
    comps.unet = wide.requires_grad_(False)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    aug.lora = [str(sd["a"]), str(sd["b"])]
    with pytest.raises(ConfigError, match=rf"^aug\.lora\[0\]: {sd['a'] / LORA_FILE}: .* does not fit .*different "
                                          r"UNet"):
        apply_finetuned(comps, aug, 10)
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


# ---------------------------------------------------------------- what else reads aug.lora


def test_finetune_command_names_one_lora_of_a_stack():
    cmd = "python tools/finetune_sd.py --recipe diff-mix --out models/ft"
    load_config(None, [f"aug.finetune_command={cmd}", "aug.textual_inversion=models/ft",
                       "aug.lora=[models/ft, latent-consistency/lcm-lora-sdv1-5:1.0]"])
    with pytest.raises(ConfigError, match=r"writes --out 'models/ft' but aug.textual_inversion / aug.lora name"):
        load_config(None, [f"aug.finetune_command={cmd}", "aug.textual_inversion=models/ft",
                           "aug.lora=[models/other, latent-consistency/lcm-lora-sdv1-5:1.0]"])
    with pytest.raises(ConfigError, match=r"writes --out 'models/ft' but"):
        load_config(None, [f"aug.finetune_command={cmd}", "aug.lora=models/other"])


def test_the_missing_made_folder_prints_its_command_and_only_it(tmp_path, monkeypatch, sd):
    monkeypatch.chdir(tmp_path)
    cmd = "python tools/finetune_sd.py --recipe diff-mix --out models/ft"
    aug = AugConfig(alpha=0.5, model=str(sd["base"]), prompt="a photo of a {name}", finetune_command=cmd,
                    lora=["models/ft", str(sd["a"])])
    with pytest.raises(ConfigError, match=rf"^aug\.lora\[0\]='models/ft': no such folder; fine-tune the generator "
                                          rf"first: {cmd}$"):
        check_generator_inputs(aug, 10)


def test_fingerprint_and_leakage_check_read_every_lora(sd, monkeypatch):
    one = generator_fingerprint({"alpha": 0.5, "model": "m", "lora": str(sd["a"])})
    assert one == generator_fingerprint({"alpha": 0.5, "model": "m", "lora": f"{sd['a']}:0.3"})  # same files
    two = generator_fingerprint({"alpha": 0.5, "model": "m", "lora": [str(sd["a"]), str(sd["b"])]})
    assert two["lora"] == f"{one['lora']}+{generator_fingerprint({'alpha': 1, 'lora': str(sd['b'])})['lora']}"

    import online_aug.data as data
    from online_aug.sources import prepare_batch_source

    seen = []
    monkeypatch.setattr(data, "check_generator_folders", lambda folders, splits: seen.extend(folders))
    monkeypatch.setattr("online_aug.generator.preflight.check_generator_inputs", lambda aug, n: None)
    cfg = load_config(None, ["aug.alpha=0.5", f"aug.lora=[{sd['a']}:0.5, {sd['b']}]", "aug.guard=off"])
    prepare_batch_source(cfg, SimpleSplits())
    assert seen[-2:] == [str(sd["a"]), str(sd["b"])]


class SimpleSplits:
    num_classes = 10

    class train:  # noqa: N801 - stands in for a split object
        edit_source = None
