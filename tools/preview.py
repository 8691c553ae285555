"""Preview what the online augmenter does: a PNG grid of real training images edited at several strengths.

Rows are real images from the training split (one per class where possible); the first column is the real image,
the others its SDEdit at each strength toward the row's target class, with the same noise along a row so that only
the strength changes. Each cell is captioned with the soft label the classifier would train on (Diff-Mix eq. 3,
``y = (1 - s^gamma) onehot(source) + s^gamma onehot(target)``, as :mod:`online_aug.policy` builds it). Images are
shown at the classifier's resolution, upscaled with nearest-neighbour so single pixels stay visible.

The generator is the run's own (:meth:`SDEditGenerator.from_config` on ``cfg.aug``: model, schedule, steps,
guidance, learned tokens / LoRA), so the preview shows exactly what a training run with that config would get.

Usage::

    python tools/preview.py --config configs/demo.yaml --out docs/preview.png
    python tools/preview.py --config configs/demo.yaml --target eight --rows 4 --tb runs/preview-tb
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from online_aug.config import Config, ConfigError, load_config
from online_aug.data import Splits, build_splits
from online_aug.devices import pick_device
from online_aug.generator import SDEditGenerator, resolve_class_names
from online_aug.policy import AugPolicy, mix_labels

DEFAULT_STRENGTHS = (0.1, 0.25, 0.5, 0.7, 0.9, 1.0)
BG, FG, DIM = (255, 255, 255), (0, 0, 0), (90, 90, 90)


def pick_rows(splits: Splits, n: int, seed: int) -> np.ndarray:
    """``n`` training indices, cycling through the classes (in random order) so that rows show different classes."""
    rng = np.random.default_rng(seed)
    labels = splits.train.labels
    classes = rng.permutation(np.unique(labels))
    per_class = {int(c): list(rng.permutation(np.nonzero(labels == c)[0])) for c in classes}
    out: list[int] = []
    while len(out) < n and any(per_class.values()):
        for c in classes:
            if per_class[int(c)] and len(out) < n:
                out.append(int(per_class[int(c)].pop()))
    return np.array(out)


def resolve_target(text: str, names: list[str]) -> int:
    """``--target`` as a class index or name."""
    if text in names:
        return names.index(text)
    try:
        i = int(text)
    except ValueError:
        raise ConfigError(f"--target {text!r} is neither a class name {names} nor an index") from None
    if not 0 <= i < len(names):
        raise ConfigError(f"--target {i} is outside 0..{len(names) - 1}")
    return i


def row_targets(cfg: Config, splits: Splits, labels: torch.Tensor, target: int | None, seed: int) -> torch.Tensor:
    """The target class of each row: ``--target``, else one draw of the config's own policy (every row edited)."""
    if target is not None:
        return torch.full_like(labels, target)
    policy = AugPolicy(replace(cfg.aug, alpha=1.0, exact_alpha=True, strengths=[1.0], strength_range=[]),
                       splits.num_classes, splits.train.class_counts())
    plan = policy.plan(labels, torch.Generator().manual_seed(seed))
    return plan.target


def soft_label(source: int, target: int, s: float, gamma: float) -> dict[int, float]:
    """The caption of one edit: the nonzero entries of its Diff-Mix soft label (the policy's own rule)."""
    row = mix_labels(torch.tensor([source]), torch.tensor([target]), torch.tensor([s]), gamma, max(source, target) + 1)
    return {c: float(row[0, c]) for c in torch.nonzero(row[0]).flatten().tolist()}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font, readable at any cell size
    except TypeError:
        return ImageFont.load_default()


def to_pil(x: torch.Tensor, cell: int) -> Image.Image:
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((cell, cell), Image.NEAREST)


def render_grid(real: torch.Tensor, edited: torch.Tensor, strengths: list[float], sources: list[int],
                targets: list[int], names: list[str], gamma: float, cell: int = 64, title: str = "") -> Image.Image:
    """The grid as a PIL image. ``real`` is ``[R, 3, H, W]``; ``edited`` ``[R, S, 3, H, W]``; all in [0, 1]."""
    R, S = len(real), len(strengths)
    fs = max(10, cell // 6)
    font, small = _font(fs), _font(max(9, fs - 1))
    pad, label_w = 6, max(cell + 2 * fs, int(fs * 0.62 * max(len(names[s]) + len(names[t]) + 3
                                                               for s, t in zip(sources, targets))))
    cap_h = 2 * (fs + 2) + 4
    head_h = (fs + 6) * (2 if title else 1) + 4
    W = label_w + (S + 1) * (cell + pad) + pad
    H = head_h + R * (cell + cap_h + pad) + pad
    img = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(img)
    y0 = 4
    if title:
        d.text((pad, y0), title, fill=FG, font=font)
        y0 += fs + 6
    cols = ["real"] + [f"s={s:g}" for s in strengths]
    for j, text in enumerate(cols):
        d.text((label_w + j * (cell + pad) + pad, y0), text, fill=FG, font=font)
    for i in range(R):
        top = head_h + i * (cell + cap_h + pad)
        src, tgt = sources[i], targets[i]
        d.text((pad, top + cell // 2 - fs), f"{names[src]}", fill=FG, font=font)
        d.text((pad, top + cell // 2 + 2), f"-> {names[tgt]}", fill=DIM, font=font)
        tiles = [real[i]] + [edited[i, j] for j in range(S)]
        for j, tile in enumerate(tiles):
            x = label_w + j * (cell + pad) + pad
            img.paste(to_pil(tile, cell), (x, top))
            if j == 0:
                lines = [f"{names[src]} 1.00"]
            else:
                y = soft_label(src, tgt, strengths[j - 1], gamma)
                lines = [f"{names[c]} {w:.2f}" for c, w in y.items()]
            for k, line in enumerate(lines):
                d.text((x, top + cell + 2 + k * (fs + 2)), line, fill=FG if k == 0 else DIM, font=small)
    return img


@torch.inference_mode()
def make_preview(cfg: Config, splits: Splits, *, rows: int = 6, strengths: list[float] | None = None,
                 target: int | None = None, seed: int = 0, cell: int = 64, device: str | torch.device = "cpu",
                 show_progress: bool = True) -> Image.Image:
    """Edit ``rows`` training images at every strength with the config's generator and draw the grid."""
    strengths = list(strengths or DEFAULT_STRENGTHS)
    names = resolve_class_names(cfg.aug.class_names, splits.class_names)
    idx = pick_rows(splits, rows, seed)
    real = torch.stack([splits.train[int(i)][0] for i in idx]).float()
    labels = torch.as_tensor(splits.train.labels[idx]).long()
    tgts = row_targets(cfg, splits, labels, target, seed)
    gen = SDEditGenerator.from_config(cfg.aug, splits.class_names, torch.device(device))
    h = gen.resolution // gen.vae_scale_factor
    edited = []
    for i in tqdm(range(len(idx)), desc="preview", disable=not show_progress, dynamic_ncols=True):
        # One noise draw per row, shared by its strengths: along a row only s changes.
        noise = torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(seed * 100_003 + i))
        S = len(strengths)
        out, _ = gen.edit(real[i:i + 1].expand(S, -1, -1, -1).to(device), torch.tensor(strengths),
                          tgts[i].repeat(S), noise=noise.expand(S, -1, -1, -1).to(device))
        edited.append(out.cpu())
    mode = f"--target {names[target]}" if target is not None else f"target_mode={cfg.aug.target_mode}"
    title = (f"{Path(cfg.aug.model).name}: {cfg.aug.schedule} {cfg.aug.scheduler} "
             f"K={cfg.aug.steps if cfg.aug.schedule == 'fewstep' else cfg.aug.grid_steps}, "
             f"cfg {cfg.aug.guidance_scale:g}, {mode}, gamma {cfg.aug.gamma:g}")
    return render_grid(real, torch.stack(edited), strengths, labels.tolist(), tgts.tolist(), names, cfg.aug.gamma,
                       cell=cell, title=title)


def write_tensorboard(img: Image.Image, tb_dir: str | Path, tag: str = "preview/grid") -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    writer.add_image(tag, np.asarray(img), 0, dataformats="HWC")
    writer.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (data, aug.* generator settings)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. aug.steps=8")
    p.add_argument("--out", default="preview.png", help="PNG to write")
    p.add_argument("--rows", type=int, default=6, help="real training images (rows)")
    p.add_argument("--strengths", default=",".join(f"{s:g}" for s in DEFAULT_STRENGTHS),
                   help="comma-separated SDEdit strengths (columns)")
    p.add_argument("--target", default=None, help="target class (name or index); default: the config's "
                                                  "target mode (intra: the source; inter/uniformize: its policy)")
    p.add_argument("--cell", type=int, default=64, help="cell size in pixels (nearest-neighbour upscale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tb", default="", help="also write the grid to TensorBoard in this folder (tag preview/grid)")
    p.add_argument("--device", default="", help="cpu / cuda (default: run.device; auto picks cuda when present)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        try:
            strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--strengths {args.strengths!r} must be comma-separated numbers") from None
        if not strengths or not all(0 < s <= 1 for s in strengths):
            raise ConfigError(f"--strengths {args.strengths!r}: each must be in (0, 1]")
        if args.rows < 1 or args.cell < 8:
            raise ConfigError("--rows must be >= 1 and --cell >= 8")
        dev = pick_device(args.device or cfg.run.device, key="--device" if args.device else "run.device")
        splits = build_splits(cfg.data)
        names = resolve_class_names(cfg.aug.class_names, splits.class_names)
        target = resolve_target(args.target, names) if args.target is not None else None
        img = make_preview(cfg, splits, rows=args.rows, strengths=strengths, target=target, seed=args.seed,
                           cell=args.cell, device=dev, show_progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    if args.tb:
        write_tensorboard(img, args.tb)
    print(f"wrote {out} ({img.width}x{img.height}){' and TensorBoard ' + args.tb if args.tb else ''} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
