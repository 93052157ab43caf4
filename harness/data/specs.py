"""Dataset specs (``datasets/<name>.yaml``) and where each dataset's folder is on disk."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from harness.config import home
from harness.data.fashion import FASHION_READERS, fashion_dir  # registers the Fashion-MNIST readers
from harness.data.readers import READERS
from harness.data.table import ImageTable
from harness.errors import UserError, unknown

REPO = Path(__file__).resolve().parents[2]
DATASETS_DIR = REPO / "datasets"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class DatasetSpec:
    """One ``datasets/<name>.yaml``: how to read a dataset and its protocol defaults."""

    name: str
    reader: str
    description: str
    how_to_get: str
    default_root: str
    ks: list[int]
    has_boxes: bool
    query_gallery: bool
    split: dict
    defaults: dict
    #: expected folder layout, shown in errors
    layout: str = ""
    #: the published split sizes, ``{split: {images: N, classes: C}}`` (empty for open folders)
    published: dict | None = None


def spec_names() -> list[str]:
    """Names of all declared datasets (the yaml file stems)."""
    return sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))


@functools.cache
def _load_spec(name: str) -> DatasetSpec:
    path = DATASETS_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {f.name for f in fields(DatasetSpec)}
    extra = set(raw) - allowed
    if extra:
        raise UserError(f"{path}: unknown keys {sorted(extra)}; valid: {sorted(allowed)}")
    raw.setdefault("name", name)
    raw.setdefault("ks", [1, 2, 4, 8])
    raw.setdefault("has_boxes", False)
    raw.setdefault("query_gallery", False)
    raw.setdefault("split", {})
    raw.setdefault("defaults", {})
    raw.setdefault("default_root", f"data/{name}")
    for key in ("reader", "description", "how_to_get"):
        if key not in raw:
            raise UserError(f"{path}: missing key '{key}'")
    return DatasetSpec(**raw)


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name raises the standard UserError."""
    if name not in spec_names():
        raise unknown("dataset", name, spec_names())
    return _load_spec(name)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fashion_candidates() -> list[Path]:
    cands = []
    if os.environ.get("DMLBENCH_DATA"):
        cands.append(Path(os.environ["DMLBENCH_DATA"]) / "fashion_mnist")
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(
                ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=20
            ).stdout
            cands += sorted({Path(ln).parent for ln in out.splitlines() if "idx" in ln})
        except (OSError, subprocess.SubprocessError):
            pass
    if DEBIAN_FASHION not in cands:
        cands.append(DEBIAN_FASHION)
    cands += [home() / "data" / "fashion_mnist", REPO / "data" / "fashion_mnist"]
    return list(dict.fromkeys(cands))


def _resolve_fashion() -> Path:
    """Fashion-MNIST: env folder, Debian package, repo data folder, else a torchvision download."""

    cands = _fashion_candidates()
    for c in cands:
        found = fashion_dir(c)
        if found is not None:
            return found
    target = home() / "data" / "fashion_mnist"  # downloads go where the user stands
    try:
        import torchvision

        torchvision.datasets.FashionMNIST(root=str(target), download=True)
    except Exception as exc:  # network errors come in many types
        tried = ", ".join(str(c) for c in cands)
        raise UserError(
            f"Fashion-MNIST not found (looked in {tried}) and download failed ({one_line(exc)}); "
            f"install it with 'apt-get install dataset-fashion-mnist' or pass --set data.root=DIR"
        ) from None
    found = fashion_dir(target)
    if found is None:  # pragma: no cover - torchvision changed its layout
        raise UserError(f"Fashion-MNIST download to {target} left no idx files")
    return found


def found_at(spec: DatasetSpec) -> Path | None:
    """Where dataset ``spec`` already is on disk (no download, no error), or None."""
    if spec.reader in FASHION_READERS:
        return next((found for c in _fashion_candidates() if (found := fashion_dir(c)) is not None), None)
    return next((c for c in _root_candidates(spec) if c.exists()), None)


def _root_candidates(spec: DatasetSpec) -> list[Path]:
    """$DMLBENCH_DATA/<name>, then the spec's default root where the user stands and in the repo."""
    rel = Path(spec.default_root)
    cands = [Path(os.environ["DMLBENCH_DATA"]) / rel.name] if os.environ.get("DMLBENCH_DATA") else []
    cands += [rel] if rel.is_absolute() else [home() / rel, REPO / rel]
    return list(dict.fromkeys(cands))


def resolve_root(spec: DatasetSpec, root: str = "") -> Path:
    """Where dataset ``spec`` lives; a missing folder raises a UserError listing what was tried."""
    how = f"get it from: {one_line(spec.how_to_get)}"
    if root:
        path = Path(root).expanduser()
        if not path.exists():
            raise UserError(f"{spec.name} data folder {path} does not exist; {how}")
        return path
    if spec.reader in FASHION_READERS:
        return _resolve_fashion()
    cands = _root_candidates(spec)
    for c in cands:
        if c.exists():
            return c
    tried = " and ".join(str(c) for c in cands)
    raise UserError(
        f"{spec.name} not found: tried {tried}; {how}; or set $DMLBENCH_DATA or pick another "
        f"folder with --set data.root=DIR"
    )


def read_raw(spec: DatasetSpec, root: Path, check: bool = True) -> dict[str, ImageTable]:
    """Run the spec's reader, adding the expected layout and download hint to layout errors."""

    if spec.reader not in READERS:
        raise unknown(f"reader of dataset '{spec.name}'", spec.reader, READERS)
    try:
        raw = READERS[spec.reader](root, spec.split)
    except UserError as exc:
        extra = f"; expected layout: {one_line(spec.layout)}" if spec.layout else ""
        raise UserError(f"{exc}{extra}; get it from: {one_line(spec.how_to_get)}") from None
    if check:
        check_published(spec, raw, root)
    return raw


def check_published(spec: DatasetSpec, raw: dict[str, ImageTable], root: Path) -> None:
    """The classes of each split must be the published ones (with the spec's own split): a
    missing, extra or renamed class folder changes the protocol, so it is refused."""
    if not spec.published or spec.split != _load_spec(spec.name).split:
        return  # a split other than the spec's (tests scale it down): no published counts to meet
    for split, table in raw.items():
        want = spec.published.get(split, {}).get("classes")
        if want is not None and table.num_classes != int(want):
            raise UserError(
                f"{spec.name} in {root}: the {split} split has {table.num_classes:,} classes, the "
                f"published split {int(want):,}; a missing, extra or misnamed class folder changes the "
                "protocol (check the folder, or `dmlbench datasets check`; data.check_published=false "
                "for a subset made on purpose)"
            )
