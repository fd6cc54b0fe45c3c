"""synth-bench's own code path on a phantom (diffdrr switched off): timings split, table and JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_bench_rows_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import train.synth.ct_source as ct_source
    import train.synth.reference as reference
    from tests.test_synth_core import _phantom
    from train.synth.bench import main

    monkeypatch.setattr(ct_source, "load_ct", lambda *_a, **_k: _phantom())
    monkeypatch.setattr(reference, "diffdrr_available", lambda: False)
    out = tmp_path / "bench.json"
    assert main(size=32, repeats=1, views=2, json_path=str(out)) == 0
    doc = json.loads(out.read_text())
    assert [r["view"] for r in doc["rows"]] == ["AP", "lateral"]
    for r in doc["rows"]:
        assert r["ours_image_s"] > 0
        assert r["ours_masks_s"] >= 0
        assert r["n_labels"] == 2
    assert doc["conditions_before"]["cpu_count"] >= 1
    assert "| AP 32² |" in capsys.readouterr().out
