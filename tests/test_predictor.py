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
