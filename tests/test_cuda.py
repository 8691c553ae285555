"""The CUDA path: generator in fp16 on a side stream, event hand-off through the ring buffers. Skipped on CPU."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_prefetcher_on_side_stream_matches_synchronous_path():
    from test_prefetch import FakeGenerator, _augmenter, _loader

    from online_aug.prefetch import Prefetcher
    from online_aug.sources import SyncAugmentedSource

    dev = torch.device("cuda")

    class CudaFake(FakeGenerator):
        def edit(self, images, strengths, targets, generator=None):
            out, finite = super().edit(images.cpu(), strengths, targets, torch.Generator().manual_seed(0))
            return out.to(images.device), finite.to(images.device)

    def aug():
        a = _augmenter(CudaFake())
        a.device = dev
        return a

    sync = SyncAugmentedSource(_loader(), aug(), dev, start=0)
    pre = Prefetcher(_loader(), aug(), dev, depth=2, starvation="wait")
    try:
        for _ in range(8):
            a, b = next(sync), next(pre)
            assert b.ready is not None and b.images.device.type == "cuda"
            torch.cuda.current_stream().wait_event(b.ready)
            assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
            pre.release(b)
    finally:
        pre.close()


def test_generator_fp16_edit_on_cuda(tmp_path):
    from tiny_sd import save_tiny_sd

    from online_aug.generator import SDEditGenerator, load_sd

    dev = torch.device("cuda")
    comps = load_sd(str(save_tiny_sd(tmp_path / "sd")), dev, torch.float16)
    gen = SDEditGenerator(comps, [f"a photo of the digit {i}" for i in range(10)], device=dev, dtype=torch.float16)
    x = torch.rand(8, 3, 32, 32, device=dev)
    out, finite = gen.edit(x, torch.full((8,), 0.7), torch.arange(8, device=dev) % 10,
                           torch.Generator(dev).manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and finite.all()
