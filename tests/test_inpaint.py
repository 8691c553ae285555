"""Object-centric edits (semantic-aug §3.3, §4.2.1): masked SDEdit on a plain UNet, an SD-inpainting (9-channel)
UNet, masks from the loader to the generator, and the bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from tiny_sd import build_tiny_sd_components

from online_aug.augment import Augmenter
from online_aug.config import AugConfig, ConfigError, load_config
from online_aug.data import LabeledImages, attach_masks
from online_aug.generator import SDComponents, SDEditGenerator
from online_aug.policy import AugPolicy

PROMPTS = ["a photo of the digit zero", "a photo of the digit one"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _components(inpainting: bool = False) -> SDComponents:
    c = build_tiny_sd_components(seed=0)
    unet = c["unet"]
    if inpainting:  # the SD-inpainting architecture: latents + mask + masked-image latents in
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = UNet2DConditionModel.from_config({**unet.config, "in_channels": 9}).eval()
    return SDComponents(c["vae"], unet, c["text_encoder"], c["tokenizer"], c["scheduler"])


def _gen(mode: str = "foreground", dilate: int = 0, inpaint: str = "blend", **kw) -> SDEditGenerator:
    return SDEditGenerator(_components(inpaint == "unet" and mode != "off"), PROMPTS, mask_mode=mode,
                           mask_dilate=dilate, inpaint=inpaint, steps=3, **kw)


def _batch(m: int = 3):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(m, 3, 16, 16, generator=g)
    masks = torch.zeros(m, 1, 16, 16)
    masks[:, :, 5:11, 4:10] = 1  # the "object"
    noise = torch.randn(m, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return images, masks, noise


def _edit(gen, images, masks, noise, s=0.9):
    m = len(images)
    return gen.edit(images, torch.full((m,), s), torch.tensor([1, 0, 1][:m]), noise=noise, masks=masks)


@pytest.mark.parametrize("dilate", [0, 2])
def test_foreground_blend_keeps_the_rest_exactly(dilate):
    images, masks, noise = _batch()
    edited, finite = _edit(_gen("foreground", dilate), images, masks, noise)
    assert finite.all()
    region = torch.nn.functional.max_pool2d(masks, 2 * dilate + 1, 1, dilate) if dilate else masks
    keep = (region == 0).expand_as(images)
    # pasted in pixel space (diffusers' apply_overlay): exact, not within a VAE round trip
    assert torch.equal(edited[keep], images[keep])
    changed = (edited - images).abs() > 1e-3
    assert changed[region.expand_as(images) > 0].float().mean() > 0.5  # the object was edited
    if dilate:  # the dilation ring is edited too
        ring = ((region > 0) & (masks == 0)).expand_as(images)
        assert changed[ring].any()


def test_background_mode_keeps_the_dilated_object():
    images, masks, noise = _batch()
    edited, _ = _edit(_gen("background", dilate=1), images, masks, noise)
    obj = (torch.nn.functional.max_pool2d(masks, 3, 1, 1) > 0).expand_as(images)
    assert torch.equal(edited[obj], images[obj])
    assert ((edited - images).abs() > 1e-3)[~obj].float().mean() > 0.5


def test_blend_changes_the_edit_inside_the_mask_and_a_full_mask_is_plain_sdedit():
    images, masks, noise = _batch()
    plain, _ = SDEditGenerator(_components(), PROMPTS, steps=3).edit(
        images, torch.full((3,), 0.9), torch.tensor([1, 0, 1]), noise=noise)
    full, _ = _edit(_gen("foreground"), images, torch.ones_like(masks), noise)
    torch.testing.assert_close(full, plain)  # nothing kept: the blend is a no-op
    part, _ = _edit(_gen("foreground"), images, masks, noise)
    inside = (masks > 0).expand_as(images)
    # the kept region was pinned to the reference at every step, which changes the edited region too
    assert not torch.allclose(part[inside], plain[inside], atol=1e-4)
    nothing, _ = _edit(_gen("foreground"), images, torch.zeros_like(masks), noise)
    assert torch.equal(nothing, images)


@pytest.mark.parametrize("schedule", ["fewstep", "grid"])
def test_inpainting_unet_path_runs_and_reads_the_mask(schedule):
    images, masks, noise = _batch()
    gen = _gen("foreground", inpaint="unet", schedule=schedule, grid_steps=10)
    calls = []
    fwd = gen.unet.forward
    gen.unet.forward = lambda x, *a, **k: calls.append(x.shape) or fwd(x, *a, **k)
    edited, finite = _edit(gen, images, masks, noise)
    assert finite.all() and calls and all(c[1] == 9 for c in calls)
    keep = (masks == 0).expand_as(images)
    assert torch.equal(edited[keep], images[keep])
    other = masks.clone()
    other[:, :, 0:3, 0:3] = 1
    moved, _ = _edit(gen, images, other, noise)
    inside = (masks > 0).expand_as(images)
    assert not torch.allclose(moved[inside], edited[inside])  # the mask channels reach the UNet


def test_unet_that_cannot_inpaint_is_an_error():
    with pytest.raises(ConfigError, match=r"aug.inpaint=unet needs an SD-inpainting UNet .* set aug.inpaint=blend"):
        SDEditGenerator(_components(), PROMPTS, mask_mode="foreground", inpaint="unet")
    with pytest.raises(ConfigError, match="aug.mask_mode=foreground or background"):
        SDEditGenerator(_components(inpainting=True), PROMPTS)
    with pytest.raises(ConfigError, match="aug.inpaint=blend runs a plain UNet"):
        SDEditGenerator(_components(inpainting=True), PROMPTS, mask_mode="background", inpaint="blend")
    gen = _gen("foreground")
    images, masks, noise = _batch()
    with pytest.raises(ValueError, match="masks must be given"):
        gen.edit(images, torch.full((3,), 0.5), torch.tensor([0, 1, 0]), noise=noise)


# ---------------------------------------------------------------- masks from the loader to the generator


def _digits_like(n: int = 8, size: int = 16) -> LabeledImages:
    x = np.zeros((n, size, size, 3), np.uint8)
    x[:, 4:12, 6:9] = 255  # a bright stroke on black
    x[:, 4:6, 4:12] = 180
    return LabeledImages(x, np.arange(n) % 2, ["zero", "one"], size)


def test_threshold_mask_travels_with_the_image_to_the_generator():
    ds = _digits_like()
    attach_masks(ds, "threshold", 0.25, "unused")
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    x, y, extras = next(iter(loader))
    m = extras["masks"]
    assert m.shape == (4, 1, 16, 16) and set(extras) == {"masks"}
    assert torch.equal(m, (x.mean(1, keepdim=True) > 0.25).float())  # computed from the very image
    cfg = AugConfig(alpha=0.5, target_mode="intra", strengths=[0.9], mask_mode="foreground", mask_dilate=0,
                    inpaint="blend")
    gen = SDEditGenerator(_components(), PROMPTS, mask_mode="foreground", mask_dilate=0, inpaint="blend", steps=2)
    aug = Augmenter(AugPolicy(cfg, 2), gen, torch.device("cpu"), seed=0, rank=0, class_names=["zero", "one"])
    batch = aug(x, y, micro_step=0, masks=m)
    edited_rows = batch.edit_target >= 0
    assert edited_rows.sum() == 2
    keep = (m == 0).expand_as(x)
    assert torch.equal(batch.images[keep], x[keep])  # background pixels untouched
    assert not torch.equal(batch.images[edited_rows], x[edited_rows])


def _write(path, size, value=255):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def test_mask_folder_is_checked_file_by_file(tmp_path):
    root, masks = tmp_path / "images", tmp_path / "masks"
    files = [root / "cat" / "a.png", root / "dog" / "b.png"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (90, 90, 90)).save(f)
    ds = LabeledImages(files, np.array([0, 1]), ["cat", "dog"], 16)
    _write(masks / "cat" / "a.png", (20, 20))
    with pytest.raises(ConfigError, match=r"mask file .*dog/b\.png .* is missing"):
        attach_masks(ds, str(masks), 0.25, root)
    _write(masks / "dog" / "b.png", (10, 20))
    with pytest.raises(ConfigError, match=r"mask file .*dog/b\.png is 10x20 but its image .* is 20x20"):
        attach_masks(ds, str(masks), 0.25, root)
    with pytest.raises(ConfigError, match="aug.mask_source='nowhere': no such folder"):
        attach_masks(ds, "nowhere", 0.25, root)
    _write(masks / "dog" / "b.png", (20, 20), 0)
    attach_masks(ds, str(masks), 0.25, root)
    x, _, extras = ds[0]
    assert extras["masks"].shape == (1, 16, 16) and extras["masks"].min() == 1  # resized, white = object
    assert ds[1][2]["masks"].max() == 0


def test_mask_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.dataset=imagefolder"):
        load_config(None, ["aug.alpha=0.5", "aug.mask_mode=foreground", f"aug.mask_source={tmp_path}"])
    with pytest.raises(ConfigError, match="aug.mask_dilate must be >= 0"):
        load_config(None, ["aug.mask_mode=foreground", "aug.mask_dilate=-1"])
    with pytest.raises(ConfigError, match="aug.mask_mode"):
        load_config(None, ["aug.mask_mode=inside"])
