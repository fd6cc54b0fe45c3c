"""VTK XML PolyData (``.vtp``) surface meshes, read with the standard library and numpy.

OpenSim ships its bone meshes as ``.vtp``. A full VTK (or meshio) install to read a few hundred small
files is more weight than the format needs: the points and polygon cells sit in ``<DataArray>`` elements,
either as ascii numbers or base64 binary (VTK's block header, optionally zlib-compressed blocks). Every
OpenSim mesh checked (``opensim-models/Geometry``, 317 files) is ascii; binary is read too so a re-saved
mesh still loads. Appended (raw) data is rejected with a clear message. Polygons are fan-triangulated and
triangle strips unrolled; vertices and lines are ignored (they enclose no volume).
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DTYPES = {
    "Int8": "i1",
    "UInt8": "u1",
    "Int16": "i2",
    "UInt16": "u2",
    "Int32": "i4",
    "UInt32": "u4",
    "Int64": "i8",
    "UInt64": "u8",
    "Float32": "f4",
    "Float64": "f8",
}


class VTPError(ValueError):
    """A .vtp file that cannot be read, with the file and the reason."""


@dataclass
class TriMesh:
    """Indexed triangles: ``vertices`` (N, 3) float64, ``faces`` (M, 3) int64, and the file they came from."""

    vertices: np.ndarray
    faces: np.ndarray
    source: str = ""

    def triangles(self) -> np.ndarray:
        """Triangles (M, 3, 3), the layout ``train.synth.mesh`` uses."""
        return self.vertices[self.faces]


def read_vtp(path: str | Path) -> TriMesh:
    """The polygons and strips of a ``.vtp`` file as triangles (coordinates in the file's units)."""
    p = Path(path)
    if not p.is_file():
        raise VTPError(f"{p}: .vtp file not found")
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        raise VTPError(f"{p}: not valid XML ({e})") from None
    if root.tag != "VTKFile" or root.get("type") != "PolyData":
        raise VTPError(f"{p}: not a VTK PolyData file (root <{root.tag} type={root.get('type')!r}>)")
    fmt = _Format(
        little=root.get("byte_order", "LittleEndian") == "LittleEndian",
        header=_DTYPES.get(root.get("header_type", "UInt32"), "u4"),
        compressed=root.get("compressor") is not None,
        where=p,
    )
    pieces = root.findall("PolyData/Piece")
    if not pieces:
        raise VTPError(f"{p}: no <Piece> in <PolyData>")
    verts, faces, offset = [], [], 0
    for piece in pieces:
        arr = piece.find("Points/DataArray")
        if arr is None:
            raise VTPError(f"{p}: a <Piece> has no <Points>")
        pts = fmt.array(arr).reshape(-1, 3).astype(np.float64)
        n_pts = int(piece.get("NumberOfPoints", len(pts)))
        if len(pts) != n_pts:
            raise VTPError(f"{p}: {len(pts)} points read but NumberOfPoints={n_pts}")
        tris = [_cells(piece.find(tag), fmt, tag) for tag in ("Polys", "Strips")]
        f = np.concatenate([t for t in tris if len(t)] or [np.zeros((0, 3), np.int64)])
        if len(f) and (f.min() < 0 or f.max() >= len(pts)):
            raise VTPError(f"{p}: a cell refers to point {int(f.max())} of {len(pts)}")
        verts.append(pts)
        faces.append(f + offset)
        offset += len(pts)
    mesh = TriMesh(np.concatenate(verts), np.concatenate(faces), str(p))
    if len(mesh.faces) == 0:
        raise VTPError(f"{p}: no polygons (a surface mesh needs <Polys> or <Strips>)")
    if not np.isfinite(mesh.vertices).all():
        raise VTPError(f"{p}: non-finite point coordinates")
    return mesh


@dataclass
class _Format:
    little: bool
    header: str  # numpy code of the binary block header's integers
    compressed: bool
    where: Path

    def array(self, el: ET.Element) -> np.ndarray:
        kind = el.get("type", "")
        if kind not in _DTYPES:
            raise VTPError(f"{self.where}: DataArray type {kind!r} is not supported")
        dt = np.dtype(_DTYPES[kind]).newbyteorder("<" if self.little else ">")
        form = el.get("format", "ascii")
        text = el.text or ""
        if form == "ascii":
            return np.array(text.split(), dtype=np.float64).astype(dt.newbyteorder("="))
        if form == "binary":
            return np.frombuffer(self._binary(text.strip()), dtype=dt).astype(dt.newbyteorder("="))
        raise VTPError(f"{self.where}: DataArray format {form!r} is not supported (only ascii and binary)")

    def _binary(self, text: str) -> bytes:
        """The payload of a base64 binary DataArray: header integers, then the (zlib) data."""
        hdt = np.dtype(self.header).newbyteorder("<" if self.little else ">")
        hs = hdt.itemsize
        try:
            if not self.compressed:
                # [nbytes][data]: VTK writes header and data as one base64 stream or as two; try both.
                head_len = 4 * -(-hs // 3)
                nbytes = int(np.frombuffer(base64.b64decode(text[:head_len])[:hs], hdt)[0])
                raw = base64.b64decode(text)
                if len(raw) >= hs + nbytes:
                    return raw[hs : hs + nbytes]
                return base64.b64decode(text[head_len:])[:nbytes]
            first = base64.b64decode(text[: 4 * -(-hs // 3)])
            nblocks = int(np.frombuffer(first[:hs], hdt)[0])
            head_len = 4 * -(-(3 + nblocks) * hs // 3)
            head = np.frombuffer(base64.b64decode(text[:head_len])[: (3 + nblocks) * hs], hdt).astype(
                np.int64
            )
            sizes = head[3:]
            body = base64.b64decode(text[head_len:])
            if len(body) < int(sizes.sum()):  # header and blocks encoded as one base64 stream
                whole = base64.b64decode(text)
                body = whole[(3 + nblocks) * hs :]
            out, pos = [], 0
            for s in sizes:
                out.append(zlib.decompress(body[pos : pos + int(s)]))
                pos += int(s)
            return b"".join(out)
        except (ValueError, zlib.error, IndexError) as e:
            raise VTPError(f"{self.where}: corrupt binary DataArray ({e})") from None


def _cells(el: ET.Element | None, fmt: _Format, tag: str) -> np.ndarray:
    """Triangles (K, 3) of a <Polys> (fan-triangulated) or <Strips> (unrolled) element."""
    if el is None:
        return np.zeros((0, 3), np.int64)
    arrays = {a.get("Name"): a for a in el.findall("DataArray")}
    if "connectivity" not in arrays or "offsets" not in arrays:
        raise VTPError(f"{fmt.where}: <{tag}> needs 'connectivity' and 'offsets' arrays")
    conn = fmt.array(arrays["connectivity"]).astype(np.int64)
    offs = fmt.array(arrays["offsets"]).astype(np.int64)
    if len(offs) == 0:
        return np.zeros((0, 3), np.int64)
    if offs[-1] != len(conn) or np.any(np.diff(offs) < 0):
        raise VTPError(f"{fmt.where}: <{tag}> offsets do not match its connectivity ({len(conn)} entries)")
    starts = np.concatenate([[0], offs[:-1]])
    out = []
    for k in np.unique(offs - starts):
        if k < 3:
            continue  # a polygon with fewer than 3 points encloses nothing
        sel = starts[(offs - starts) == k]
        cells = conn[sel[:, None] + np.arange(k)[None, :]]  # (n, k)
        for j in range(1, k - 1):
            if tag == "Polys":  # fan from the first point
                out.append(cells[:, [0, j, j + 1]])
            else:  # strip: triangle j-1 is (j-1, j, j+1), every other one flipped to keep the winding
                tri = cells[:, [j - 1, j, j + 1]]
                out.append(tri[:, [1, 0, 2]] if (j - 1) % 2 else tri)
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)
