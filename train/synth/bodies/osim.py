"""OpenSim model files (``.osim``, OpenSim 4 XML): where each bone mesh sits in a chosen pose.

OpenSim stores each mesh in its body segment's own frame; a skeleton in a pose is the composition of the
joint transforms from ground to every body. Per joint (OpenSim's documented conventions):

* the joint connects a frame F fixed on the parent body and a frame M fixed on the child body; each is a
  ``PhysicalOffsetFrame`` (``translation``, ``orientation`` = body-fixed X-Y-Z Euler angles) on its body;
* the joint's coordinates move M relative to F: ``PinJoint`` rotates about F's z, ``SliderJoint`` translates
  along x, ``UniversalJoint`` rotates about x then the new y, ``Gimbal``/``Ball`` x-y-z body-fixed,
  ``FreeJoint`` the same plus a translation, ``WeldJoint`` not at all; a ``CustomJoint``'s
  ``SpatialTransform`` gives each of three rotation axes (applied in sequence, body-fixed) and three
  translation axes (in F) a function of one coordinate (constant, linear, spline, multiplier);
* so a child body's pose is ``X_ground_child = X_ground_parent · X_parent_F · X_FM(q) · X_child_M^-1``.

Coordinates take their ``default_value`` unless overridden (a pose), and ``CoordinateCouplerConstraint``
dependents (e.g. the patella following the knee) are recomputed from their independent coordinate. Only
what is needed to place meshes is read; masses, muscles and wrapping are ignored.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.interpolate import CubicSpline


class OsimError(ValueError):
    """An .osim file (or pose) that cannot be used, with the reason."""


@dataclass(frozen=True)
class MeshRef:
    """One mesh attached to a body: its file name, per-axis scale, and the body it rides on."""

    body: str
    mesh_file: str
    scale: tuple[float, float, float]


@dataclass
class Joint:
    name: str
    kind: str
    parent: str  # body name, "ground" for the ground frame
    child: str
    x_parent_f: np.ndarray  # 4x4, F in the parent body's frame
    x_child_m: np.ndarray  # 4x4, M in the child body's frame
    coordinates: list[str]
    motion: Callable[[dict[str, float]], np.ndarray]  # coordinate values -> X_FM (4x4)


@dataclass
class OsimModel:
    """Bodies, meshes, joints and coordinates of one .osim file."""

    path: Path
    bodies: list[str]
    meshes: list[MeshRef]
    joints: list[Joint]
    defaults: dict[str, float]
    couplers: list[tuple[str, str, Callable[[float], float]]] = field(default_factory=list)
    credits: str = ""
    publications: str = ""

    def coordinate_values(self, pose: dict[str, float] | None = None) -> dict[str, float]:
        """Default coordinate values, overridden by ``pose`` (radians / metres), couplers applied."""
        q = dict(self.defaults)
        for k, val in (pose or {}).items():
            if k not in q:
                raise OsimError(f"{self.path.name}: pose names unknown coordinate {k!r}")
            q[k] = float(val)
        for dep, ind, fn in self.couplers:
            q[dep] = fn(q[ind])
        return q

    def body_frames(self, pose: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """Each body's pose in ground (4x4, model units), for the default pose overridden by ``pose``."""
        q = self.coordinate_values(pose)
        frames = {"ground": np.eye(4)}
        pending = list(self.joints)
        while pending:
            ready = [j for j in pending if j.parent in frames]
            if not ready:
                names = ", ".join(f"{j.name} ({j.parent} -> {j.child})" for j in pending)
                raise OsimError(f"{self.path.name}: joints not connected to ground: {names}")
            for j in ready:
                frames[j.child] = frames[j.parent] @ j.x_parent_f @ j.motion(q) @ np.linalg.inv(j.x_child_m)
                pending.remove(j)
        return frames


def read_osim(path: str | Path) -> OsimModel:
    """Parse the bodies, attached meshes, joints, coordinates and coupler constraints of an .osim file."""
    p = Path(path)
    if not p.is_file():
        raise OsimError(f"{p}: .osim file not found")
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        raise OsimError(f"{p}: not valid XML ({e})") from None
    model = root.find("Model")
    if model is None:
        raise OsimError(f"{p}: no <Model> element")
    if model.find("JointSet") is None:
        raise OsimError(
            f"{p}: no <JointSet>; only OpenSim 4 model files are supported (re-save it in OpenSim 4)"
        )

    bodies, meshes = [], []
    for body in model.iterfind("BodySet/objects/Body"):
        name = body.get("name", "")
        bodies.append(name)
        for mesh in body.iterfind("attached_geometry/Mesh"):
            frame = (mesh.findtext("socket_frame") or "..").strip()
            if frame not in ("..", f"/bodyset/{name}"):
                raise OsimError(
                    f"{p}: mesh {mesh.get('name')!r} on {name!r} is attached to frame {frame!r}; "
                    "only meshes on the body frame itself are supported"
                )
            scale = _vec(mesh.findtext("scale_factors"), 3, default=(1.0, 1.0, 1.0))
            meshes.append(MeshRef(name, (mesh.findtext("mesh_file") or "").strip(), tuple(scale)))

    joints, defaults = [], {}
    for j in model.iterfind("JointSet/objects/*"):
        joint, coords = _joint(j, p)
        joints.append(joint)
        defaults.update(coords)

    couplers = []
    for c in model.iterfind("ConstraintSet/objects/CoordinateCouplerConstraint"):
        ind = (c.findtext("independent_coordinate_names") or "").split()
        dep = (c.findtext("dependent_coordinate_name") or "").strip()
        if len(ind) != 1 or not dep:
            raise OsimError(f"{p}: coupler {c.get('name')!r} must have one independent coordinate")
        fn_el = c.find("coupled_coordinates_function")
        fn = _function(next(iter(fn_el), None) if fn_el is not None else None, p)
        scale = float(c.findtext("scale_factor") or 1.0)
        couplers.append((dep, ind[0], lambda x, fn=fn, s=scale: s * fn(x)))
    return OsimModel(
        path=p,
        bodies=bodies,
        meshes=meshes,
        joints=joints,
        defaults=defaults,
        couplers=couplers,
        credits=" ".join((model.findtext("credits") or "").split()),
        publications=" ".join((model.findtext("publications") or "").split()),
    )


def rotation(axis: np.ndarray | list[float], angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` (rad) about ``axis`` (right-handed, Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def frame(translation: np.ndarray | list[float], xyz_body_fixed: np.ndarray | list[float]) -> np.ndarray:
    """4x4 transform of an OpenSim frame: body-fixed X-Y-Z Euler angles, then the translation."""
    ax, ay, az = xyz_body_fixed
    x = np.eye(4)
    x[:3, :3] = rotation([1, 0, 0], ax) @ rotation([0, 1, 0], ay) @ rotation([0, 0, 1], az)
    x[:3, 3] = translation
    return x


def _vec(text: str | None, n: int, default: tuple[float, ...] | None = None) -> np.ndarray:
    if text is None or not text.strip():
        if default is None:
            raise OsimError(f"expected {n} numbers, found none")
        return np.array(default, dtype=np.float64)
    v = np.array(text.split(), dtype=np.float64)
    if v.shape != (n,):
        raise OsimError(f"expected {n} numbers, got {text.strip()!r}")
    return v


def _body_of(path: str) -> str:
    path = path.strip()
    if path in ("/ground", "ground", "../ground"):
        return "ground"
    return path.rstrip("/").split("/")[-1]


def _joint(j: ET.Element, p: Path) -> tuple[Joint, dict[str, float]]:
    kind, name = j.tag, j.get("name", "")
    offsets = {}
    for fr in j.iterfind("frames/PhysicalOffsetFrame"):
        x = frame(
            _vec(fr.findtext("translation"), 3, (0, 0, 0)), _vec(fr.findtext("orientation"), 3, (0, 0, 0))
        )
        offsets[fr.get("name", "")] = (_body_of(fr.findtext("socket_parent") or ""), x)

    def side(tag: str) -> tuple[str, np.ndarray]:
        ref = (j.findtext(tag) or "").strip()
        if ref in offsets:
            return offsets[ref]
        if not ref:
            raise OsimError(f"{p}: joint {name!r} has no <{tag}>")
        return _body_of(ref), np.eye(4)  # a socket straight to a body: F (or M) is the body frame

    parent, x_pf = side("socket_parent_frame")
    child, x_cm = side("socket_child_frame")
    coords = {
        c.get("name", ""): float(c.findtext("default_value") or 0.0)
        for c in j.iterfind("coordinates/Coordinate")
    }
    names = list(coords)
    motion = _motion(kind, j, names, p)
    return Joint(name, kind, parent, child, x_pf, x_cm, names, motion), coords


def _motion(kind: str, j: ET.Element, names: list[str], p: Path) -> Callable[[dict[str, float]], np.ndarray]:
    """X_FM as a function of the coordinate values, for the joint types OpenSim models use."""
    ex, ey, ez = np.eye(3)

    def need(n: int) -> None:
        if len(names) != n:
            raise OsimError(f"{p}: {kind} {j.get('name')!r} should have {n} coordinates, has {len(names)}")

    def seq(axes: list[np.ndarray], qs: list[float], t: np.ndarray | None = None) -> np.ndarray:
        x = np.eye(4)
        r = np.eye(3)
        for a, q in zip(axes, qs, strict=True):
            r = r @ rotation(a, q)
        x[:3, :3] = r
        if t is not None:
            x[:3, 3] = t
        return x

    if kind == "WeldJoint":
        return lambda q: np.eye(4)
    if kind == "PinJoint":
        need(1)
        return lambda q: seq([ez], [q[names[0]]])
    if kind == "SliderJoint":
        need(1)
        return lambda q: seq([], [], ex * q[names[0]])
    if kind == "UniversalJoint":
        need(2)
        return lambda q: seq([ex, ey], [q[names[0]], q[names[1]]])
    if kind in ("GimbalJoint", "BallJoint"):
        need(3)
        return lambda q: seq([ex, ey, ez], [q[n] for n in names])
    if kind == "FreeJoint":
        need(6)
        return lambda q: seq([ex, ey, ez], [q[n] for n in names[:3]], np.array([q[n] for n in names[3:]]))
    if kind == "CustomJoint":
        st = j.find("SpatialTransform")
        if st is None:
            raise OsimError(f"{p}: CustomJoint {j.get('name')!r} has no <SpatialTransform>")
        axes: dict[str, tuple[np.ndarray, str | None, Callable[[float], float]]] = {}
        for ta in st.iterfind("TransformAxis"):
            cs = (ta.findtext("coordinates") or "").split()
            if len(cs) > 1:
                raise OsimError(f"{p}: {j.get('name')!r} {ta.get('name')}: functions of several coordinates")
            fn_el = next((c for c in ta if c.tag not in ("coordinates", "axis")), None)
            axes[ta.get("name", "")] = (
                _vec(ta.findtext("axis"), 3),
                cs[0] if cs else None,
                _function(fn_el, p),
            )

        def custom(q: dict[str, float]) -> np.ndarray:
            vals = {k: fn(q[c] if c else 0.0) for k, (_, c, fn) in axes.items()}
            rot = [k for k in ("rotation1", "rotation2", "rotation3") if k in axes]
            x = seq([axes[k][0] for k in rot], [vals[k] for k in rot])
            for k in ("translation1", "translation2", "translation3"):
                if k in axes:
                    x[:3, 3] += axes[k][0] * vals[k]
            return x

        return custom
    raise OsimError(f"{p}: joint type {kind} ({j.get('name')!r}) is not supported")


def _function(el: ET.Element | None, p: Path) -> Callable[[float], float]:
    """An OpenSim Function element as a callable of one value."""
    if el is None:
        return lambda x: 0.0  # an axis without a function does not move
    tag = el.tag
    if tag == "Constant":
        v = float(el.findtext("value") or 0.0)
        return lambda x: v
    if tag == "LinearFunction":
        c = np.array((el.findtext("coefficients") or "1 0").split(), dtype=np.float64)
        return lambda x: float(c[0] * x + c[1])
    if tag in ("SimmSpline", "NaturalCubicSpline", "GCVSpline"):
        xs = np.array((el.findtext("x") or "").split(), dtype=np.float64)
        ys = np.array((el.findtext("y") or "").split(), dtype=np.float64)
        if len(xs) != len(ys) or len(xs) < 2:
            raise OsimError(f"{p}: {tag} needs matching x and y with at least 2 points")
        if len(xs) == 2:
            return lambda x: float(np.interp(x, xs, ys))
        spline = CubicSpline(xs, ys, bc_type="natural")
        return lambda x: float(spline(x))
    if tag == "MultiplierFunction":
        holder = el.find("function")
        inner = _function(next(iter(holder), None) if holder is not None else None, p)
        s = float(el.findtext("scale") or 1.0)
        return lambda x: s * inner(x)
    if tag == "PolynomialFunction":
        c = np.array((el.findtext("coefficients") or "0").split(), dtype=np.float64)
        return lambda x: float(np.polyval(c, x))
    raise OsimError(f"{p}: function type {tag} is not supported")
