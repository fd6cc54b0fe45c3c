"""FluoroSAM: image encoder + prompt encoder + mask decoder, defined once.

Training, ONNX export and the streaming node all use this module. Its forward pieces are
split the way a real-time node needs them: the image is encoded once per frame, the text is
turned into a token once per prompt (and cached), and ``decode`` runs all prompts of a frame
as one batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .image_encoder import ImageEncoder
from .lite_encoder import HighResSpec
from .mask_decoder import MaskDecoder, upscale_channels
from .prompt_encoder import PromptEncoder


def _high_res_plan(cfg: ModelConfig) -> tuple[HighResSpec | None, int]:
    """The high-res path's geometry: features at half the input, c = the upscaler's channels.

    Returns the encoder's spec and the decoder's high_res_scale (features over upscaler
    resolution), or (None, 1) when the path is off.
    """
    md, ie = cfg.mask_decoder, cfg.image_encoder
    if not md.high_res_features:
        return None, 1
    grid, up = ie.embedding_size, 2**md.upscale_stages
    factor = (ie.img_size // 2) // grid  # high-res side / grid side
    if factor * grid != ie.img_size // 2 or factor not in (up, 2 * up):
        raise ValueError(
            f"high-res features at half the input ({ie.img_size // 2} px) need the upscaler to reach "
            f"it or half of it: grid {grid} x {up} (upscale_stages {md.upscale_stages}) does not"
        )
    c = upscale_channels(cfg.prompt_encoder.embed_dim, md.upscale_stages)
    return HighResSpec(channels=c, factor=factor), factor // up


class FluoroSAM(nn.Module):
    def __init__(self, cfg: ModelConfig, text_model: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.prompt_encoder.embed_dim
        high_res, scale = _high_res_plan(cfg)
        self.image_encoder = ImageEncoder(cfg.image_encoder, out_dim=d, high_res=high_res)
        self.prompt_encoder = PromptEncoder(
            cfg.prompt_encoder,
            text_feature_dim=cfg.text.feature_dim,
            image_embedding_size=cfg.image_encoder.embedding_size,
            input_image_size=cfg.image_encoder.img_size,
            text_model=text_model,
        )
        self.mask_decoder = MaskDecoder(d, cfg.mask_decoder, high_res_scale=scale)

    @property
    def img_size(self) -> int:
        return self.cfg.image_encoder.img_size

    @property
    def embedding_channels(self) -> int:
        """Channels of encode_image's output: the embedding (+ the high-res features, v2)."""
        return self.image_encoder.out_channels

    @property
    def low_res_size(self) -> int:
        return self.cfg.image_encoder.embedding_size * self.mask_decoder.upscale_factor

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised, padded input [B, 3, S, S] -> image embedding [B, embedding_channels, E, E]."""
        return self.image_encoder(x)

    def text_tokens(self, text_features: torch.Tensor) -> torch.Tensor:
        """Text-encoder features [K, F] -> final prompt tokens [K, C] (after MLP and VQ)."""
        return self.prompt_encoder.text_tokens(text_features)[0]

    def decode(
        self,
        image_embedding: torch.Tensor,
        text_tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame's embedding [1, C, E, E] and K prompt tokens [K, C] -> K prompts' masks.

        Points, if given, are [K, N, 2] (x, y) in model-input pixels with labels [K, N]
        (1 positive, 0 negative, -1 padding). Returns low-res logits [K, 3, L, L] and IoU [K, 3].
        """
        sparse = self.prompt_encoder.sparse_embeddings(text_tokens, point_coords, point_labels)
        return self.mask_decoder(
            image_embedding,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            self.prompt_encoder.dense_embedding(),
        )

    def forward(
        self,
        images: torch.Tensor,
        text_features: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: B images, one prompt each. Returns (logits, iou, vq_loss).

        Each prompt is decoded against its own image embedding.
        """
        emb = self.encode_image(images)
        tokens, vq_loss = self.prompt_encoder.text_tokens(text_features)
        sparse = self.prompt_encoder.sparse_embeddings(tokens, point_coords, point_labels)
        logits, iou = self.mask_decoder(
            emb, self.prompt_encoder.get_dense_pe(), sparse, self.prompt_encoder.dense_embedding()
        )
        return logits, iou, vq_loss
