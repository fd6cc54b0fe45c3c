""" "Did you mean": a prompt far from everything the model was trained on is flagged with its nearest
vocabulary entries, in `segment`, in the control socket's reply and in `prompts add`; it still runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fluorosam_rt.bundle import ASSETS_DIR
from fluorosam_rt.cli import main as cli_main
from fluorosam_rt.phrasings import SOURCES, expand_vocabulary
from fluorosam_rt.prompt_hints import (
    ENV_VAR,
    HintTable,
    PromptHints,
    build_table,
    calibrate,
    load_vocabulary,
    table_filename,
)
from fluorosam_rt.service.control import send_command
from fluorosam_rt.text.base import normalize_prompt

sys.path.insert(0, str(Path(__file__).parent))
from test_node import running_node, wait_for

VOCABULARY = ASSETS_DIR.parents[1] / "configs" / "vocabulary.yaml"
SMALL = {
    "structures": ("lung_upper_lobe_left", "lung_lower_lobe_left", "femur_left", "femur_right", "heart"),
    "groups": ("left_lung", "lungs", "femurs"),
    "tools": ("k_wire", "guidewire"),
}
# Not in the calibration list: the flag rate on these is a real check.
NONSENSE = ("banana bread", "carrot cake", "fishing rod", "swimming pool", "paper clip", "treasure map")


def small_doc() -> dict:
    """A few real vocabulary entries (with the real misspelling table): a table built in seconds."""
    doc = load_vocabulary(VOCABULARY)
    out = {"misspellings": doc["misspellings"]}
    for key, names in SMALL.items():
        out[key] = [e for e in doc[key] if e["name"] in names]
    return out


@pytest.fixture(scope="module")
def hint_dir(tmp_path_factory, bundle) -> Path:
    """A hint table for the test model's text encoder (the real MiniLM), in its own cache folder."""
    d = tmp_path_factory.mktemp("hints")
    build_table(bundle.text_encoder, small_doc()).save(d / table_filename(bundle.text_encoder.identity()))
    return d


@pytest.fixture
def hint_env(hint_dir, monkeypatch) -> Path:
    monkeypatch.setenv(ENV_VAR, str(hint_dir))
    return hint_dir


@pytest.fixture(scope="module")
def table(hint_dir, bundle) -> HintTable:
    return HintTable.load(hint_dir / table_filename(bundle.text_encoder.identity()))


def heldout_of(name: str, sources=("laterality", "synonym", "article", "template", "plural")) -> list[str]:
    ex = expand_vocabulary(small_doc())[name]
    return [p.text for p in ex.phrasings if p.key in ex.heldout and p.source in sources]


def test_calibration_rule() -> None:
    rng = np.random.default_rng(0)
    heldout, unrelated = rng.uniform(0.7, 1.0, 1000), rng.uniform(0.2, 0.5, 200)
    t, summary = calibrate(heldout, unrelated)
    assert summary["rule"] == "heldout"
    assert t == pytest.approx(np.quantile(heldout, 0.02))
    assert summary["heldout_flagged"] == pytest.approx(0.02, abs=0.002)
    assert summary["unrelated_flagged"] == 1.0
    # overlapping samples: the threshold rises until 95% of the nonsense is still caught
    t2, summary2 = calibrate(rng.uniform(0.3, 1.0, 1000), rng.uniform(0.2, 0.6, 200))
    assert summary2["rule"] == "unrelated"
    assert summary2["unrelated_flagged"] >= 0.95
    assert t2 > np.quantile(rng.uniform(0.3, 1.0, 1000), 0.02)


def test_nonsense_is_far_and_vocabulary_prompts_are_not(table, bundle) -> None:
    assert normalize_prompt("left lung") in table.texts
    assert 0.3 < table.threshold < 0.95, table.calibration
    every_heldout = [t for name in ("left_lung", "femur_left", "k_wire") for t in heldout_of(name, SOURCES)]
    assert not set(map(normalize_prompt, every_heldout)) & set(table.texts)  # never in the table
    held = heldout_of("left_lung") + heldout_of("femur_left") + heldout_of("k_wire")
    assert held, "the small vocabulary should hold out some phrasings"
    hints = table.check(["banana bread", "left lung", "Left  Lung", *held], bundle.text_encoder)
    banana, left_lung, spaced, *rest = hints
    assert banana.far
    assert len(banana.nearest) == 3
    assert all(-1 <= s < table.threshold for _, s in banana.nearest)
    assert not left_lung.far
    assert left_lung.similarity == 1.0
    assert left_lung.nearest[0] == ("left lung", pytest.approx(1.0, abs=0.01))
    assert not spaced.far
    for h in rest:  # paraphrases the model never saw are still near its vocabulary
        assert not h.far, (h.text, h.similarity, table.threshold)
    assert sum(h.far for h in table.check(list(NONSENSE), bundle.text_encoder)) >= len(NONSENSE) - 1
    d = banana.to_dict()
    assert d["far"] is True
    assert [len(x) for x in d["nearest"]] == [2, 2, 2]
    assert "did you mean" in banana.message()


def test_table_round_trip_and_missing_table(table, hint_dir, tmp_path, bundle) -> None:
    again = HintTable.load(table.save(tmp_path / "t.safetensors"))
    assert again.texts == table.texts
    assert again.threshold == table.threshold
    a = table.check(["banana bread", "left femer"], bundle.text_encoder)
    b = again.check(["banana bread", "left femer"], bundle.text_encoder)
    assert [x.similarity for x in a] == pytest.approx([x.similarity for x in b], abs=0.01)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / table_filename(bundle.text_encoder.identity())).write_bytes(b"garbage")
    missing = PromptHints(bundle.text_encoder, search=[tmp_path / "bad"], cache_dir=tmp_path / "empty")
    assert missing.check(["banana bread"]) is None
    assert "python -m fluorosam_rt.prompt_hints build" in missing.note
    found = PromptHints(bundle.text_encoder, cache_dir=hint_dir)
    assert found.check(["banana bread"])[0].far


def test_segment_says_did_you_mean_and_still_runs_the_prompt(hint_env, checkpoint, tmp_path, capsys) -> None:
    image = ASSETS_DIR / "samples" / "chest_pa_2c35005f.png"
    out = tmp_path / "out"
    args = ["segment", str(image), "--prompt", "banana bread", "--prompt", "left lung"]
    assert cli_main([*args, "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "'banana bread' is far from every prompt the model was trained on" in printed
    assert "did you mean" in printed
    assert printed.count("did you mean") == 1  # "left lung" is not flagged
    result = json.loads((out / "result.json").read_text())
    banana, lung = result["masks"]
    assert (out / banana["file"]).is_file()  # the far prompt still ran
    assert banana["hint"]["far"] is True
    assert len(banana["hint"]["nearest"]) == 3
    assert lung["hint"]["far"] is False
    assert lung["hint"]["nearest"][0][0] == "left lung"


def test_control_reply_and_prompts_add_carry_the_hint(hint_env, tmp_path, bundle, capsys) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        cv2.imwrite(str(frames / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (64, 80), np.uint8))
    source = {"kind": "replay", "path": str(frames), "fps": 10, "loop": True}
    ctl = f"ipc://{tmp_path}/control"
    with running_node(tmp_path, bundle, source, prompts=("lungs",)) as (_app, sub):
        sub.receive(timeout=20)
        request = {"cmd": "add", "prompts": ["banana bread", {"text": "left lung", "id": "L"}]}
        reply = send_command(ctl, request)
        assert reply["ok"], reply
        assert [p["id"] for p in reply["prompts"]] == ["lungs", "banana bread", "L"]  # it still runs
        banana, lung = reply["hints"]
        assert (banana["id"], banana["far"]) == ("banana bread", True)
        assert len(banana["nearest"]) == 3
        assert all(isinstance(p, str) and isinstance(s, float) for p, s in banana["nearest"])
        assert (lung["id"], lung["far"], lung["nearest"][0][0]) == ("L", False, "left lung")
        wait_for(lambda: "banana bread" in [p.id for p in sub.receive(timeout=5).prompts], 10, "far prompt")
        assert cli_main(["prompts", "add", "fishing rod", "--control", ctl]) == 0
        cap = capsys.readouterr()
        assert "'fishing rod' is far from every prompt" in cap.err
        assert "fishing rod" in cap.out  # the prompt list on stdout, as before
        assert send_command(ctl, {"cmd": "list"}).get("hints") is None  # only add/set are checked


@pytest.mark.slow
def test_full_vocabulary_table_separates_paraphrases_from_nonsense(bundle, tmp_path) -> None:
    """The real vocabulary (~4,400 trained texts, minutes on two cores): few held-out paraphrases flagged,
    nonsense outside the calibration list caught, the misspellings people type understood."""
    table = build_table(bundle.text_encoder, load_vocabulary(VOCABULARY))
    cal = table.calibration
    assert cal["heldout_n"] > 800
    assert cal["heldout_flagged"] <= 0.03, cal
    more = (*NONSENSE, "mountain bike", "coffee table", "running shoes", "ice cream", "volcano", "headphones")
    far = [h.far for h in table.check(list(more), bundle.text_encoder)]
    assert sum(far) >= 0.9 * len(far), cal
    typed = ["femer", "humerous", "clavical", "vertabra", "kirshner wire", "lft femur", "L3", "screws"]
    assert not any(h.far for h in table.check(typed, bundle.text_encoder))
