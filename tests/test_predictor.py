"""The predictor: one image encode per frame, batched prompts from the cache, masks at the
input's size with the padding removed, and a calibrated presence decision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluorosam_rt.model.build import build_model
from fluorosam_rt.model.config import small_realtime
from fluorosam_rt.predictor import Predictor, calibrate_presence_threshold
from fluorosam_rt.prompts import Prompt
from fluorosam_rt.text.minilm import MiniLMTextEncoder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(small_realtime(128)).eval()


@pytest.fixture(scope="module")
def text_encoder():
    return MiniLMTextEncoder()


@pytest.fixture
def frame():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:300, 0:200]
    img = 1000 + 800 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 30, (300, 200))
    return img.astype(np.uint16)


def test_encodes_image_once_and_text_never_on_frame_path(model, text_encoder, frame):
    pred = Predictor(model, text_encoder)
    pred.add_prompts(["lungs", "heart", "spine"])
    assert pred.cache.encode_count == 3
    for _ in range(3):
        pred.set_image(frame)
        results = pred.predict(["lungs", "heart", "spine"])
        assert len(results) == 3
    assert pred.image_encode_count == 3
    assert pred.cache.encode_count == 3


def test_masks_at_input_size_without_padding(model, text_encoder, frame):
    pred = Predictor(model, text_encoder)
    pred.set_image(frame)
    (res,) = pred.predict(["lungs"], return_logits=True)
    assert res.mask.shape == frame.shape
    assert res.logits.shape == frame.shape
    info = pred.info
    assert info.original_hw == (300, 200)
    assert info.resized_hw == (128, 85)
    # Reference: upsample to the padded input, crop the valid region, resize back.
    low, iou = pred.predict_low_res([Prompt("lungs")])
    best = int(iou[0].argmax())
    up = F.interpolate(low[:, best : best + 1], (128, 128), mode="bilinear", align_corners=False)
    ref = F.interpolate(up[..., :128, :85], (300, 200), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(res.logits, ref.numpy(), atol=1e-5)
    # Without cropping, the padding would be stretched into the mask: a different result.
    wrong = F.interpolate(up, (300, 200), mode="bilinear", align_corners=False)[0, 0]
    assert np.abs(wrong.numpy() - res.logits).max() > 1e-3


def test_batched_prompts_equal_individual(model, text_encoder, frame):
    pred = Predictor(model, text_encoder)
    pred.set_image(frame)
    prompts = [Prompt("lungs"), Prompt("heart", ((50.0, 60.0),), (1,)), Prompt("spine")]
    batched = pred.predict(prompts, return_logits=True)
    for p, b in zip(prompts, batched):
        (single,) = pred.predict([p], return_logits=True)
        np.testing.assert_allclose(single.logits, b.logits, atol=1e-4)
        assert single.best_index == b.best_index


def test_points_change_the_result(model, text_encoder, frame):
    pred = Predictor(model, text_encoder)
    pred.set_image(frame)
    (plain,) = pred.predict([Prompt("heart")], return_logits=True)
    (clicked,) = pred.predict([Prompt("heart", ((100.0, 150.0), (20.0, 30.0)), (1, 0))], return_logits=True)
    assert np.abs(plain.logits - clicked.logits).max() > 1e-4


def test_presence_threshold_gates_masks(model, text_encoder, frame):
    pred = Predictor(model, text_encoder, presence_threshold=1e9)
    pred.set_image(frame)
    (res,) = pred.predict(["lungs"])
    assert not res.present
    assert not res.mask.any()


def test_predict_before_image_is_an_error(model, text_encoder):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(model, text_encoder).predict(["lungs"])


def test_calibrated_threshold_bounds_false_positives():
    rng = np.random.default_rng(0)
    absent = rng.normal(0.1, 0.1, 400)
    present = rng.normal(0.7, 0.15, 400)
    t = calibrate_presence_threshold(present, absent, max_false_positive_rate=0.05)
    assert np.mean(absent >= t) <= 0.05
    assert np.mean(present >= t) > 0.95
    # The lowest feasible threshold: any lower candidate breaks the FP limit.
    lower = np.nextafter(t, -np.inf)
    assert np.mean(absent >= lower) > 0.05 or np.mean(present >= lower) == np.mean(present >= t)
    with pytest.raises(ValueError, match="absent"):
        calibrate_presence_threshold(present, [])


def test_torch_engine_fuses_batchnorm_on_a_private_copy(model):
    from engines.torch_engine import TorchEngine

    keys_before = set(model.state_dict())
    engine = TorchEngine(model)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(engine.encode_image(x), model.encode_image(x), atol=1e-4, rtol=1e-4)
    assert set(model.state_dict()) == keys_before
    assert engine.image_encoder is not model.image_encoder


# --------------------------------------------------------------------------- low-res logits -> masks


def _torch_reference(low: torch.Tensor, s: int, resized: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
    """The official two-step upsampling in torch: to the padded input, crop, to the output size."""
    up = F.interpolate(low[:, None].float(), (s, s), mode="bilinear", align_corners=False)
    crop = up[..., : resized[0], : resized[1]]
    return F.interpolate(crop, out, mode="bilinear", align_corners=False)[:, 0].numpy()


def _low_res(k: int, n: int, seed: int) -> torch.Tensor:
    """Smooth blobs crossing 0 at different levels, plus noise: boundaries everywhere."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(k, 1, max(2, n // 8), max(2, n // 8), generator=g)
    smooth = F.interpolate(coarse, (n, n), mode="bicubic", align_corners=False)[:, 0]
    low = 4 * smooth - torch.linspace(-1, 2, k)[:, None, None] + 0.3 * torch.randn(k, n, n, generator=g)
    low[-1] = -3.0  # one prompt with nothing above any threshold used here
    return low


# (L, S, input size, output size): square and non-square inputs, full size, downsampled, same size
GEOMETRIES = [
    (64, 128, (1024, 1024), (1024, 1024)),
    (128, 256, (1024, 1024), (1024, 1024)),
    (128, 256, (1024, 1300), (1024, 1300)),
    (64, 128, (300, 200), (300, 200)),
    (128, 256, (1024, 1024), (128, 128)),
    (64, 256, (1024, 768), (256, 192)),
]


@pytest.mark.parametrize(("L", "S", "in_hw", "out_hw"), GEOMETRIES)
def test_logits_at_size_is_the_official_upsampling(L, S, in_hw, out_hw):
    """Stated tolerance: OpenCV's bilinear equals torch's (align_corners=False) to float32 rounding,
    1e-5 + 1e-5 * |logit|."""
    from fluorosam_rt.postprocess import logits_at_size
    from fluorosam_rt.preprocess import resized_shape

    resized, _ = resized_shape(*in_hw, S)
    low = _low_res(4, L, seed=L + out_hw[0])
    got = logits_at_size(low, S, resized, out_hw)
    np.testing.assert_allclose(got, _torch_reference(low, S, resized, out_hw), atol=1e-5, rtol=1e-5)
    assert got.shape == (4, *out_hw)
    assert got.dtype == np.float32


@pytest.mark.parametrize(("L", "S", "in_hw", "out_hw"), GEOMETRIES)
@pytest.mark.parametrize("thr", [0.0, 0.5, -0.3])
def test_masks_are_exactly_the_thresholded_logits(L, S, in_hw, out_hw, thr):
    from fluorosam_rt.postprocess import logits_at_size, masks_at_size
    from fluorosam_rt.preprocess import resized_shape

    resized, _ = resized_shape(*in_hw, S)
    low = _low_res(4, L, seed=L + out_hw[1])
    want = logits_at_size(low, S, resized, out_hw) > thr
    got = masks_at_size(low, S, resized, out_hw, thr)
    assert got.dtype == np.uint8
    assert got.shape == (4, *out_hw)
    assert set(np.unique(got)) <= {0, 1}
    np.testing.assert_array_equal(got.view(bool), want)
    assert want[:-1].any()
    assert not want[-1].any()
    # absent prompts are all zero; the others are unchanged
    some = masks_at_size(low, S, resized, out_hw, thr, present=[False, True, False, True])
    assert not some[0].any()
    assert not some[2].any()
    np.testing.assert_array_equal(some[[1, 3]], got[[1, 3]])
    with pytest.raises(ValueError, match="present"):
        masks_at_size(low, S, resized, out_hw, thr, present=[True])


def test_predict_masks_equal_the_logits_path(model, text_encoder, frame):
    pred = Predictor(model, text_encoder, mask_threshold=0.1)
    pred.set_image(frame)
    prompts = ["lungs", Prompt("heart", ((50.0, 60.0),), (1,)), "spine"]
    fast = pred.predict(prompts)
    slow = pred.predict(prompts, return_logits=True)
    for a, b in zip(fast, slow):
        assert a.mask.dtype == b.mask.dtype == np.bool_
        assert a.mask.shape == frame.shape
        np.testing.assert_array_equal(a.mask, b.logits > 0.1)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_mask_path_costs_a_fraction_of_float_planes():
    """K = 10 masks of a 1024 x 1024 frame from 128 x 128 logits, CPU time (the machine is shared):
    the mask path must cost under half of the float planes + threshold it replaces."""
    import time

    from fluorosam_rt.postprocess import masks_at_size

    low = _low_res(10, 128, seed=3)
    scratch = np.empty((1024, 1024), np.float32)

    def old() -> list[np.ndarray]:  # the path this replaced: torch to S, float planes, threshold
        import cv2

        x = F.interpolate(low[:, None], (256, 256), mode="bilinear", align_corners=False)[:, 0].numpy()
        full = np.empty((10, 1024, 1024), dtype=np.float32)
        for i in range(10):
            full[i] = cv2.resize(np.ascontiguousarray(x[i]), (1024, 1024), interpolation=cv2.INTER_LINEAR)
        return [(full[i] > 0).view(np.uint8) for i in range(10)]

    def new() -> np.ndarray:
        return masks_at_size(low, 256, (256, 256), (1024, 1024), 0.0, scratch=scratch)

    cpu: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(7):  # interleaved, so load drift hits both alike
        for name, fn in (("old", old), ("new", new)):
            c0 = time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
    ratio = float(np.median(cpu["new"]) / np.median(cpu["old"]))
    assert ratio < 0.5, (ratio, cpu)
