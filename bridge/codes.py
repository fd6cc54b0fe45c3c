"""Coded anatomy for free-text prompts: which SNOMED CT concept a DICOM SEG segment names.

A PACS, a viewer or a registry query can only find "all left lung segmentations" when the
segment carries a code, not just the words a surgeon typed. The table covers the structures a
fluoroscopy prompt usually names; laterality ("left lung") is the base concept plus a
laterality modifier, as DICOM segmentations code it. Anything else gets a generic code and
keeps the prompt text as its label, so nothing is silently mis-coded.

Plain tuples, no DICOM library: the relay and other consumers can use the table without
pydicom, and the tests check every entry against pydicom's copy of the DICOM code tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCT = "SCT"


@dataclass(frozen=True)
class CodeTriple:
    value: str
    scheme: str
    meaning: str


ANATOMICAL_STRUCTURE = CodeTriple("91723000", SCT, "Anatomical Structure")  # CID 7150 category
PHYSICAL_OBJECT = CodeTriple("260787004", SCT, "Physical object")
LEFT = CodeTriple("7771000", SCT, "Left")
RIGHT = CodeTriple("24028007", SCT, "Right")

# normalised name -> (SNOMED CT concept id, meaning); the category is anatomical unless listed
# in _OBJECTS. Meanings are those of DICOM PS3.16's tables.
_ANATOMY: dict[str, tuple[str, str]] = {
    "lung": ("39607008", "Lung"),
    "heart": ("80891009", "Heart"),
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "kidney": ("64033007", "Kidney"),
    "stomach": ("69695003", "Stomach"),
    "pancreas": ("15776009", "Pancreas"),
    "gallbladder": ("28231008", "Gallbladder"),
    "aorta": ("15825003", "Aorta"),
    "trachea": ("44567001", "Trachea"),
    "esophagus": ("32849002", "Esophagus"),
    "bronchus": ("955009", "Bronchus"),
    "diaphragm": ("5798000", "Diaphragm"),
    "mediastinum": ("72410000", "Mediastinum"),
    "colon": ("71854001", "Colon"),
    "small intestine": ("30315005", "Small intestine"),
    "brain": ("12738006", "Brain"),
    "spine": ("421060004", "Spine"),
    "cervical spine": ("122494005", "Cervical spine"),
    "thoracic spine": ("122495006", "Thoracic spine"),
    "lumbar spine": ("122496007", "Lumbar spine"),
    "vertebra": ("51282000", "Vertebra"),
    "sacrum": ("54735007", "Sacrum"),
    "coccyx": ("64688005", "Coccyx"),
    "pelvis": ("816092008", "Pelvis"),
    "hip": ("29836001", "Hip"),
    "hip joint": ("24136001", "Hip joint"),
    "femur": ("71341001", "Femur"),
    "tibia": ("12611008", "Tibia"),
    "fibula": ("87342007", "Fibula"),
    "patella": ("64234005", "Patella"),
    "knee": ("72696002", "Knee"),
    "rib": ("113197003", "Rib"),
    "clavicle": ("51299004", "Clavicle"),
    "scapula": ("79601000", "Scapula"),
    "humerus": ("85050009", "Humerus"),
    "radius": ("131190003", "Radius"),
    "ulna": ("23416004", "Ulna"),
    "sternum": ("56873002", "Sternum"),
    "skull": ("89546000", "Skull"),
    "prostate": ("41216001", "Prostate"),
    "uterus": ("35039007", "Uterus"),
    "thorax": ("816094009", "Thorax"),
    "abdomen": ("818981001", "Abdomen"),
    "bone": ("272673000", "Bone"),
    # devices a fluoroscopy prompt names as often as anatomy
    "catheter": ("19923001", "Catheter"),
    "stent": ("65818007", "Stent"),
    "needle": ("79068005", "Needle"),
    "screw": ("68183006", "Screw"),
}
_OBJECTS = {"catheter", "stent", "needle", "screw"}

_SYNONYMS = {
    "lungs": "lung",
    "kidneys": "kidney",
    "ribs": "rib",
    "ribcage": "rib",
    "vertebrae": "vertebra",
    "vertebral column": "spine",
    "spinal column": "spine",
    "oesophagus": "esophagus",
    "gall bladder": "gallbladder",
    "femoral bone": "femur",
    "hips": "hip",
    "clavicles": "clavicle",
    "scapulae": "scapula",
    "chest": "thorax",
    "cranium": "skull",
    "screws": "screw",
    "stents": "stent",
}
_PAIRED = {"lung", "kidney", "hip", "hip joint", "femur", "tibia", "fibula", "patella", "knee", "rib"}
_PAIRED |= {"clavicle", "scapula", "humerus", "radius", "ulna"}


@dataclass(frozen=True)
class SegmentCoding:
    """What a segment is called: category, type, optional laterality, and whether it was found."""

    category: CodeTriple
    type: CodeTriple
    laterality: CodeTriple | None
    coded: bool  # False: a generic code, the prompt text is the only specific description
    label: str  # human-readable segment label


def normalise(text: str) -> str:
    t = text.lower().strip()
    t = re.sub(r"['’]s\b", "", t)
    t = re.sub(r"[^a-z0-9 ]+", " ", t)
    words = [w for w in t.split() if w not in {"the", "a", "an", "patient", "patients", "of"}]
    return " ".join(words)


def code_for_prompt(text: str) -> SegmentCoding:
    """The coding of one prompt; never raises (an unknown structure gets the generic code)."""
    name = normalise(text)
    laterality = None
    for word, code in (("left", LEFT), ("right", RIGHT)):
        if name.startswith(word + " "):
            laterality, name = code, name[len(word) + 1 :]
            break
    name = _SYNONYMS.get(name, name)
    if name in _ANATOMY and (laterality is None or name in _PAIRED):
        value, meaning = _ANATOMY[name]
        category = PHYSICAL_OBJECT if name in _OBJECTS else ANATOMICAL_STRUCTURE
        return SegmentCoding(category, CodeTriple(value, SCT, meaning), laterality, True, text.strip())
    return SegmentCoding(ANATOMICAL_STRUCTURE, ANATOMICAL_STRUCTURE, None, False, text.strip())
