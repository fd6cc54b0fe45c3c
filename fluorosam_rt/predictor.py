"""Raw X-ray in, one mask per prompt out, with the image encoded once.

The predictor is the model's user-facing contract, shared by the ``segment`` CLI, the
streaming node, the benchmark and evaluation. Its frame path is a row of stateless stages, each
taking what the one before returned, so every caller runs the same code:

    preprocess(pixels) -> (x, info)          resize, window, pad
    encode(x)          -> embedding           once per frame, on the engine
    decode(embedding, info, prompts) -> (low-res logits [K,3,L,L], IoU [K,3])   one batched call
    select(logits, iou) -> (chosen [K,L,L], scores [K])    best of the multimask outputs
    present(scores)    -> [bool] * K          the calibrated presence gate
    mask_planes(chosen, info, out_hw, present) -> uint8 [K,H,W]   padding removed, at any size

``set_image`` + ``predict`` (as segment-anything layers ``predict`` over ``predict_torch``) keep one
image's embedding for any number of prompt calls. The node calls the stages itself and stamps the
time between them.

What the predictor provides: deterministic preprocessing, one image encode per frame, all
prompts decoded in one batched call from cached tokens, masks returned at the input's own size
with the model's padding removed (the official code stretches the padding into the mask), and a
calibrated "structure not present" decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engines.base import Engine
from engines.chain import EngineChain
from engines.torch_engine import TorchEngine

from .model.sam import FluoroSAM
from .postprocess import logits_at_size, masks_at_size
from .preprocess import PreprocessInfo, Preprocessor, preprocessor_for
from .prompts import Prompt, PromptCache, tensor_digest
from .text.base import TextEncoder


@dataclass
class MaskResult:
    prompt: Prompt
    mask: np.ndarray  # bool [H, W] at the input's size
    score: float  # predicted IoU of the chosen multimask output
    scores: tuple[float, ...]  # predicted IoU of all multimask outputs
    best_index: int
    present: bool
    logits: np.ndarray | None = None  # float32 [H, W] logits of the chosen output, on request


@torch.no_grad()
def prompt_tokens(
    model: FluoroSAM, text_encoder: TextEncoder, texts: list[str], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Prompt texts -> the model's final prompt tokens [K, C]: the one text-to-token path
    (the predictor's prompt cache and the prompt cache shipped with a model both use it)."""
    feats = text_encoder.encode(texts).to(device)
    return model.text_tokens(feats)


def token_identity(model: FluoroSAM, text_encoder: TextEncoder) -> str:
    """Identity of everything between a prompt string and its final token."""
    pe = model.prompt_encoder
    tensors = list(pe.clip_mlp.state_dict().values())
    if pe.vq is not None:
        tensors.append(pe.vq.codebook)
    vq_state = "vq" if pe.vq is not None and pe.vq.enabled else "novq"
    return tensor_digest(tensors, extra=f"{text_encoder.identity()}|{vq_state}")


def calibrate_presence_threshold(
    present_scores: Sequence[float], absent_scores: Sequence[float], max_false_positive_rate: float = 0.05
) -> float:
    """Score threshold for the "structure present" decision, from held-out prompts.

    The official gate (predicted IoU < 0 -> empty) is effectively never triggered, so absent
    structures always get a mask. We pick, among thresholds whose false-positive rate on absent
    prompts is within the limit, the one that keeps the most present prompts (ties: the lowest).
    """
    present = np.asarray(present_scores, dtype=np.float64)
    absent = np.asarray(absent_scores, dtype=np.float64)
    if absent.size == 0:
        raise ValueError("calibration needs scores of absent prompts")
    if not 0.0 <= max_false_positive_rate < 1.0:
        raise ValueError("max_false_positive_rate must be in [0, 1)")
    candidates = np.unique(np.concatenate([present, np.nextafter(absent, np.inf), [-np.inf]]))
    best_t, best_tp = float(np.nextafter(absent.max(), np.inf)), -1
    for t in candidates:
        fpr = float(np.mean(absent >= t))
        if fpr > max_false_positive_rate:
            continue
        tp = int(np.sum(present >= t))
        if tp > best_tp:
            best_t, best_tp = float(t), tp
    return best_t


class Predictor:
    """Encode an image once, then decode any number of prompts against it.

    ``engine`` runs the frame path (default: PyTorch eager on ``device``; a bare back end is
    wrapped in an ``EngineChain`` without fallbacks); the prompt path (text ->
    token, off the frame path) always runs on the PyTorch model. ``cache`` holds the prompt tokens
    (default: an empty cache keyed by the model's token identity). ``presence_threshold``: a
    prompt whose best predicted IoU is below it is reported absent with an empty mask.
    ``mask_threshold``: the logit above which a pixel is in the mask.
    """

    def __init__(
        self,
        model: FluoroSAM,
        text_encoder: TextEncoder,
        cache: PromptCache | None = None,
        preprocessor: Preprocessor | None = None,
        presence_threshold: float = 0.0,
        mask_threshold: float = 0.0,
        device: str | torch.device = "cpu",
        engine: Engine | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # Always a chain (one back end without fallbacks when given a bare engine), so failure
        # counts and switches have one owner whoever built the predictor.
        engine = engine if engine is not None else TorchEngine(self.model, self.device)
        self.engine = engine if isinstance(engine, EngineChain) else EngineChain(engine)
        self.text_encoder = text_encoder
        self.cache = cache if cache is not None else PromptCache(token_identity(model, text_encoder))
        self.preprocessor = preprocessor or preprocessor_for(model.cfg)
        self.presence_threshold = presence_threshold
        self.mask_threshold = mask_threshold
        self._embedding: torch.Tensor | None = None
        self._info: PreprocessInfo | None = None
        self._scratch: np.ndarray | None = None  # mask_planes(): one reused float plane (one frame thread)
        self.image_encode_count = 0  # images encode() has run: the node's status reads it

    # -- prompts -------------------------------------------------------------------------
    def _token_fn(self, texts: list[str]) -> torch.Tensor:
        return prompt_tokens(self.model, self.text_encoder, texts, self.device)

    def add_prompts(self, texts: Sequence[str]) -> None:
        """Encode prompts into the cache (the only place text encoding happens)."""
        self.cache.encode(list(texts), self._token_fn)

    # -- the frame path, stage by stage ------------------------------------------------------
    def preprocess(self, pixels: np.ndarray) -> tuple[torch.Tensor, PreprocessInfo]:
        """Raw pixels -> the model's padded input [3, S, S] and where the image sits in it.

        Raises ValueError / TypeError / cv2.error on a frame that cannot be an X-ray image.
        """
        return self.preprocessor(pixels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input [3, S, S] -> image embedding, on the engine (counted)."""
        emb = self.engine.encode_image(x.unsqueeze(0))
        self.image_encode_count += 1
        return emb

    @torch.no_grad()
    def decode(
        self, embedding: torch.Tensor, info: PreprocessInfo, prompts: Sequence[Prompt]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched decode of cached prompts against an embedding: ([K,3,L,L] logits, [K,3] IoU).

        Prompts are grouped by point count so each group is one decoder call with no padding
        tokens that would change a text-only prompt's result. Points are in the input's pixels.
        """
        tokens = self.cache.lookup([p.text for p in prompts])
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p.points), []).append(i)
        n, m = self.engine.low_res_size, self.engine.num_multimask_outputs
        logits = torch.empty((len(prompts), m, n, n))
        iou = torch.empty((len(prompts), m))
        for n_points, idx in groups.items():
            coords = labels = None
            if n_points:
                coords = torch.tensor(
                    [[(x * info.scale, y * info.scale) for x, y in prompts[i].points] for i in idx],
                    dtype=torch.float64,
                )
                labels = torch.tensor([list(prompts[i].labels) for i in idx], dtype=torch.float64)
            lg, io = self.engine.decode(embedding, tokens[idx], coords, labels)
            logits[idx] = lg.float().cpu()
            iou[idx] = io.float().cpu()
        return logits, iou

    @staticmethod
    def select(low_res: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best of the multimask outputs: ([K,3,L,L], [K,3]) -> ([K,L,L] logits, [K] scores)."""
        best = iou.argmax(dim=1)
        rows = torch.arange(low_res.shape[0], device=low_res.device)
        return low_res[rows, best], iou[rows, best]

    def present(self, scores: Sequence[float] | torch.Tensor) -> list[bool]:
        """The calibrated "structure present" decision per prompt."""
        return [float(s) >= self.presence_threshold for s in scores]

    def logits_planes(
        self, low_res: torch.Tensor, info: PreprocessInfo, out_hw: tuple[int, int] | None = None
    ) -> np.ndarray:
        """[K, L, L] logits -> [K, H, W] float32 logits at the input's size, padding removed.

        Bilinear to the padded model input (the official step), crop the padding away, then
        bilinear to the output size (the input's size by default, or a downsampled size for the
        stream): :func:`~fluorosam_rt.postprocess.logits_at_size`. For thresholded masks use
        :meth:`mask_planes`, which gives the same pixels far cheaper.
        """
        hw = out_hw if out_hw is not None else info.original_hw
        return logits_at_size(low_res, self.engine.img_size, info.resized_hw, hw)

    def mask_planes(
        self,
        low_res: torch.Tensor,
        info: PreprocessInfo,
        out_hw: tuple[int, int] | None = None,
        present: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """[K, L, L] logits -> [K, H, W] uint8 masks, 1 where ``logits_planes(...) > mask_threshold``.

        Absent prompts (``present[i]`` False) get all-zero masks without being computed. The
        float plane each mask is resized into is reused across masks and frames.
        """
        h, w = out_hw if out_hw is not None else info.original_hw
        hw = (int(h), int(w))
        if self._scratch is None or self._scratch.shape != hw:
            self._scratch = np.empty(hw, dtype=np.float32)
        return masks_at_size(
            low_res, self.engine.img_size, info.resized_hw, hw, self.mask_threshold, present, self._scratch
        )

    # -- one image, many prompt calls ------------------------------------------------------------
    def set_image(self, pixels: np.ndarray) -> None:
        """Preprocess and encode one image; later predict() calls reuse the embedding."""
        x, info = self.preprocess(pixels)
        self.set_embedding(self.encode(x), info)

    def set_embedding(self, embedding: torch.Tensor, info: PreprocessInfo) -> None:
        """Use an image embedding computed elsewhere (an inference engine, a test fixture)."""
        self._embedding = embedding
        self._info = info

    @property
    def info(self) -> PreprocessInfo:
        if self._info is None:
            raise RuntimeError("call set_image() before predict()")
        return self._info

    def predict_low_res(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """decode() against the current image."""
        if self._embedding is None:
            raise RuntimeError("call set_image() before predict()")
        return self.decode(self._embedding, self.info, prompts)

    def postprocess(self, low_res: torch.Tensor, out_hw: tuple[int, int] | None = None) -> np.ndarray:
        """logits_planes() for the current image."""
        return self.logits_planes(low_res, self.info, out_hw)

    def masks(
        self,
        low_res: torch.Tensor,
        out_hw: tuple[int, int] | None = None,
        present: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """mask_planes() for the current image."""
        return self.mask_planes(low_res, self.info, out_hw, present)

    @torch.no_grad()
    def predict(self, prompts: Sequence[str | Prompt], return_logits: bool = False) -> list[MaskResult]:
        """Masks for prompts on the current image. Unknown prompts are encoded first."""
        ps = [Prompt.coerce(p) for p in prompts]
        if not ps:
            return []
        missing = [p.text for p in ps if p.text not in self.cache]
        if missing:
            self.add_prompts(missing)
        low, iou = self.predict_low_res(ps)
        chosen, best_scores = self.select(low, iou)
        best = iou.argmax(dim=1)
        scores = [float(v) for v in best_scores]
        present = self.present(scores)
        full = self.postprocess(chosen) if return_logits else None
        if full is not None:
            masks = (full > self.mask_threshold) & np.asarray(present)[:, None, None]
        else:
            masks = self.masks(chosen, present=present).view(bool)
        return [
            MaskResult(
                prompt=p,
                mask=masks[i],
                score=scores[i],
                scores=tuple(float(v) for v in iou[i]),
                best_index=int(best[i]),
                present=present[i],
                logits=full[i] if full is not None else None,
            )
            for i, p in enumerate(ps)
        ]
