"""Turn a trained run into the embedded default model: calibrate, install, cache the vocabulary's tokens.

``python -m train.ship --checkpoint runs/x/model.safetensors --calib-data <FluoroSeg root> [...]``

1. The presence threshold is calibrated on the synthetic validation split(s) (the even-numbered
   images, so the odd ones stay a held-out check of the false-positive rate) and written into
   the file's metadata, which is where ``load_bundle`` reads it. Views of a held-out body are
   refused; training bodies the data lacks are named (``training_bodies_missing``). The eval
   suite's calibration set covers every training body: ``--calib-data out/eval_sets/calib --cases all``
   (``train/eval_suite.py``).
2. The file is copied to ``fluorosam_rt/assets/default_model.safetensors`` (size checked).
3. The prompt tokens of every vocabulary phrasing are precomputed into
   ``fluorosam_rt/assets/prompt_cache/``, keyed by the model's token identity; ``load_bundle``
   seeds every node's and CLI's prompt cache from it, so vocabulary prompts need no text encoding.
4. The "did you mean" table (text features of the canonical prompts and training phrasings, and
   its calibrated threshold; ``fluorosam_rt/prompt_hints.py``) is written beside the tokens.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

MAX_BYTES = 25 * 1024 * 1024


def ship(
    checkpoint: str, calib_data: str | list[str], cases: str = "even", max_fpr: float = 0.05
) -> dict[str, object]:
    from fluorosam_rt.bundle import ASSETS_DIR, DEFAULT_MODEL_PATH, load_bundle
    from fluorosam_rt.predictor import prompt_tokens, token_identity
    from fluorosam_rt.prompt_hints import build_table, load_vocabulary, table_filename
    from fluorosam_rt.prompts import PromptCache, prompt_texts_from_yaml
    from train.evaluate import EvalOptions, calibrate_checkpoint
    from train.synth.vocabulary import DEFAULT_VOCABULARY

    t = calibrate_checkpoint(checkpoint, calib_data, "val", EvalOptions(clicks=(), cases=cases), max_fpr)
    missing = _missing_training_bodies(checkpoint)
    if missing:
        print(f"warning: the calibration data has no views of the training bodies {', '.join(missing)}")
    size = Path(checkpoint).stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{checkpoint} is {size / 2**20:.1f} MiB; the embedded model must be <= 25 MiB")
    DEFAULT_MODEL_PATH.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, DEFAULT_MODEL_PATH)
    b = load_bundle()
    cache_dir = ASSETS_DIR / "prompt_cache"
    if cache_dir.is_dir():
        for pattern in ("prompt-tokens-*.safetensors", "prompt-hints-*.safetensors"):
            for old in cache_dir.glob(pattern):
                old.unlink()
    cache = PromptCache(token_identity(b.model, b.text_encoder), directory=cache_dir)
    texts = prompt_texts_from_yaml(DEFAULT_VOCABULARY)

    cache.encode(texts, lambda keys: prompt_tokens(b.model, b.text_encoder, keys))
    hints = build_table(b.text_encoder, load_vocabulary(DEFAULT_VOCABULARY))
    hints_path = hints.save(cache_dir / table_filename(hints.identity))
    return {
        "presence_threshold": t,
        "training_bodies_missing": missing,
        "model": str(DEFAULT_MODEL_PATH),
        "bytes": size,
        "prompt_cache": str(cache.path),
        "prompts": len(cache),
        "prompt_hints": str(hints_path),
        "prompt_hints_calibration": hints.calibration,
    }


def _missing_training_bodies(checkpoint: str) -> list[str]:
    """Built training bodies with no view in the calibration data just recorded in the checkpoint."""
    from fluorosam_rt.checkpoint import load_native
    from train.synth.body_choice import _registry_names
    from train.synth.ct_source import CTInputError

    try:
        bodies = set(_registry_names("all"))
    except CTInputError:  # no body built here (e.g. a toy checkout): nothing to cover
        return []
    return sorted(
        bodies - set(load_native(checkpoint).meta.get("presence_calibration", {}).get("bodies", []))
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument(
        "--calib-data",
        required=True,
        action="append",
        help="FluoroSeg root with a val split (repeatable: the roots are pooled)",
    )
    ap.add_argument("--cases", default="even", choices=["all", "even", "odd"])
    ap.add_argument("--max-fpr", type=float, default=0.05)
    a = ap.parse_args()
    print(ship(a.checkpoint, a.calib_data, a.cases, a.max_fpr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
