"""docs/conformance.md is what the code generates, and what a running SCP negotiates (issue 20)."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
from pynetdicom import AE

from fluorosam_rt.cli import main
from fluorosam_rt.sources.dicom_conformance import conformance_markdown
from fluorosam_rt.sources.dicom_scp import DicomStorageSource

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
CT = "1.2.840.10008.5.1.4.1.1.2"
MPEG2 = "1.2.840.10008.1.2.4.100"


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n### ", start + 1)
    return text[start : end if end > 0 else None]


def _uids(section: str) -> list[str]:
    return re.findall(r"^\| [^|]+ \| (1\.2\.840\.10008\.[0-9.]+) \|", section, flags=re.M)


def test_the_document_is_what_the_code_generates():
    assert DOC.read_text() == conformance_markdown(), (
        "docs/conformance.md disagrees with the code: regenerate it with "
        "`fluorosam-rt conformance --markdown --out docs/conformance.md` and review the diff"
    )


def test_cli_prints_the_statement(capsys):
    assert main(["conformance", "--markdown"]) == 0
    assert capsys.readouterr().out == conformance_markdown()


def test_a_running_scp_negotiates_what_the_document_says():
    text = DOC.read_text()
    sop_classes = _uids(_section(text, "### 2.1"))
    syntaxes = _uids(_section(text, "### 2.2"))
    assert len(sop_classes) == 11
    assert len(syntaxes) >= 4
    src = DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST")
    src.start(lambda frame: None)
    try:
        assert src.transfer_syntaxes == syntaxes
        # Every listed SOP class is accepted, a CT is not.
        ae = AE(ae_title="CONF")
        for uid in [*sop_classes, CT]:
            ae.add_requested_context(uid, syntaxes[:4] if uid.startswith("1.2.840.10008.1.1") else syntaxes)
        assoc = ae.associate("127.0.0.1", src.address[1], ae_title="FSAMTEST")
        assert assoc.is_established
        accepted = sorted({cx.abstract_syntax for cx in assoc.accepted_contexts})
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assoc.release()
        assert accepted == sorted(sop_classes)
        assert rejected == {CT: 0x03}
        # Each listed transfer syntax is accepted on its own for XA, MPEG-2 is not.
        ae = AE(ae_title="CONF")
        xa = sop_classes[0]
        for ts in [*syntaxes, MPEG2]:
            ae.add_requested_context(xa, [ts])
        assoc = ae.associate("127.0.0.1", src.address[1], ae_title="FSAMTEST")
        assert assoc.is_established
        got = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
        refused = {cx.transfer_syntax[0]: cx.result for cx in assoc.rejected_contexts}
        assoc.release()
        assert got == syntaxes
        assert refused == {MPEG2: 0x04}
    finally:
        src.stop()
    assert pydicom.uid.JPEGLosslessSV1 in syntaxes  # the syntax XA archives use most
