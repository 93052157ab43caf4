"""Dataset readers: parse each dataset's own metadata into raw class-disjoint splits.

Every reader has the signature ``reader(root, split_spec) -> {"train": ImageTable, "test": ...}``
(In-Shop: ``"train"/"query"/"gallery"``) and is registered in :data:`READERS` by name. Readers
only parse list files (no per-image ``stat``), so SOP and iNaturalist load in about a second;
:func:`harness.data.check_dataset` is where images are opened.

Class ranges in ``split_spec`` (``train_classes: [lo, hi]``, inclusive) are over the dataset's
native class ids: CUB ids 1-200, 1-based position of a sorted class folder, 1-based position in
Aircraft's ``variants.txt``, Fashion-MNIST labels 0-9. Tests pass scaled-down ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from harness.data.table import ImageTable
from harness.errors import UserError

Reader = Callable[[Path, dict], dict[str, ImageTable]]
READERS: dict[str, Reader] = {}

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def register(name: str) -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------- helpers


def _need(path: Path, hint: str) -> Path:
    """Return ``path`` or raise a UserError naming it (a wrong/incomplete layout)."""
    if not path.exists():
        raise UserError(f"missing {path} ({hint})")
    return path


def _lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [ln.strip() for ln in fh if ln.strip()]


def _records(path: Path, expected: str, types: Sequence[type], rest: bool = False) -> list[list]:
    """Each non-empty line split into ``len(types)`` fields converted by ``types``; ``rest``: the
    last field takes the rest of the line. A malformed line is a UserError naming the file, the
    line number and what was expected."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=len(types) - 1) if rest else line.split()
            try:
                if len(parts) < len(types):
                    raise ValueError
                out.append([typ(v) for typ, v in zip(types, parts)])
            except ValueError:
                raise UserError(f"{path}:{number}: expected '{expected}', got {line.strip()[:80]!r}") from None
    return out


def _require_every(img_ids: Sequence[str], found: dict, what: str, path: Path) -> None:
    """Every image id of images.txt must have a ``what`` in ``path``; the first that lacks one is named."""
    missing = next((i for i in img_ids if i not in found), None)
    if missing is not None:
        raise UserError(f"image id {missing!r} of images.txt has no {what} in {path}")


def _table(
    ids: np.ndarray,
    names: dict | None = None,
    paths: list[str] | None = None,
    array: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> ImageTable:
    """Build a table with contiguous labels from native class ids (sorted id order)."""
    uniq, labels = np.unique(np.asarray(ids), return_inverse=True)
    class_names = [str(names[u]) if names else str(u) for u in uniq.tolist()]
    return ImageTable(
        labels=labels.astype(np.int64).reshape(-1),
        class_names=class_names,
        paths=paths,
        array=array,
        boxes=boxes,
    )


def _range_mask(ids: np.ndarray, rng: Sequence[int], what: str) -> np.ndarray:
    if not (isinstance(rng, (list, tuple)) and len(rng) == 2):
        raise UserError(f"bad split spec {what}={rng!r}: expected [first, last]")
    return (ids >= int(rng[0])) & (ids <= int(rng[1]))


def _split_by_ranges(
    ids: np.ndarray,
    split_spec: dict,
    names: dict | None,
    paths: list[str] | None = None,
    array: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> dict[str, ImageTable]:
    """Cut one pooled set into train/test by the spec's inclusive class-id ranges. A class in
    neither range (an extra class folder shifts the ids past the end) is refused: it would move a
    class out of the split without a word."""
    out = {}
    inside = np.zeros(len(ids), dtype=bool)
    for split in ("train", "test"):
        if f"{split}_classes" in split_spec:
            inside |= _range_mask(ids, split_spec[f"{split}_classes"], f"{split}_classes")
    if not inside.all():
        extra = sorted({str(names[i]) if names else str(i) for i in np.unique(ids[~inside]).tolist()})
        raise UserError(
            f"{len(extra)} class(es) fall outside the split's classes {split_spec.get('train_classes')} + "
            f"{split_spec.get('test_classes')}: {', '.join(extra[:5])}; an extra or misnamed class "
            "folder shifts every class id (remove it)"
        )
    for split in ("train", "test"):
        key = f"{split}_classes"
        if key not in split_spec:
            raise UserError(f"dataset split spec lacks '{key}'")
        idx = np.flatnonzero(_range_mask(ids, split_spec[key], key))
        if idx.size == 0:
            raise UserError(f"no images in {split} classes {split_spec[key]} (wrong dataset folder?)")
        out[split] = _table(
            ids[idx],
            names,
            paths=[paths[i] for i in idx] if paths is not None else None,
            array=array[idx] if array is not None else None,
            boxes=boxes[idx] if boxes is not None else None,
        )
    return out


def class_folders(images: Path) -> list[Path]:
    """The class folders of ``images/<class>/<file>``, sorted by name: hidden folders (an editor's
    or a notebook's ``.ipynb_checkpoints``), ``__MACOSX``-style folders and folders without an
    image are not classes. They would shift every class id and move a class across the
    class-disjoint boundary, so each one skipped is reported."""
    import warnings

    folders, skipped = [], []
    for p in sorted(p for p in images.iterdir() if p.is_dir()):
        has_images = not p.name.startswith((".", "__")) and any(
            f.suffix.lower() in IMAGE_EXTS and not f.name.startswith(".") for f in p.iterdir()
        )
        (folders if has_images else skipped).append(p)
    if skipped:
        names = ", ".join(p.name for p in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(
            f"{images}: {len(skipped)} folder(s) are not classes and were skipped ({names}): "
            "hidden, system or without images",
            stacklevel=2,
        )
    return folders


def _class_folders(images: Path, split_spec: dict) -> dict[str, ImageTable]:
    """``images/<class>/<file>`` layout: classes sorted by folder name, ids 1..C."""
    folders = class_folders(images)
    if not folders:
        raise UserError(f"no class folders in {images} (expected {images}/<class>/<image>)")
    paths: list[str] = []
    ids: list[int] = []
    for cid, folder in enumerate(folders, start=1):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith("."))
        paths.extend(str(f) for f in files)
        ids.extend([cid] * len(files))
    names = {i: f.name for i, f in enumerate(folders, start=1)}
    return _split_by_ranges(np.asarray(ids, dtype=np.int64), split_spec, names, paths=paths)


@register("image_folder")
def read_image_folder(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """``<root>/<class>/<image>`` (or ``<root>/images/<class>/``): classes sorted by folder name,
    the first ``train_fraction`` of them train, the rest test (class-disjoint)."""
    images = root / "images" if (root / "images").is_dir() else root
    if not images.is_dir():
        raise UserError(f"missing {root} (expected {root}/<class>/<image>)")
    n = len(class_folders(images))
    fraction = float(split_spec.get("train_fraction", 0.5))
    n_train = min(max(1, int(round(n * fraction))), n - 1)
    if n < 2:
        raise UserError(f"{images} has {n} class folder(s); a class-disjoint split needs at least 2")
    return _class_folders(images, {"train_classes": [1, n_train], "test_classes": [n_train + 1, n]})


def _first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


# ----------------------------------------------------------------------------- CUB


_CUB_META = ("images.txt", "image_class_labels.txt", "classes.txt")


@register("cub200")
def read_cub200(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """CUB-200-2011 as distributed (``images.txt`` etc.) or VPTSP-G's ``images/<class>/``."""
    base = next(
        (b for b in (root, root / "CUB_200_2011") if any((b / f).exists() for f in _CUB_META)),
        None,
    )
    if base is None:
        if (root / "images").is_dir():
            return _class_folders(root / "images", split_spec)
        raise UserError(
            f"missing {root / 'images.txt'} (CUB-200-2011 needs images.txt, image_class_labels.txt, "
            f"classes.txt, images/ or a class-folder layout images/<class>/*.jpg)"
        )
    hint = "CUB-200-2011 needs images.txt, image_class_labels.txt, classes.txt, images/"
    for f in _CUB_META:
        _need(base / f, hint)
    rows = _records(base / "images.txt", "<image id> <relative path>", (str, str), rest=True)
    img_ids = [r[0] for r in rows]
    paths = [str(base / "images" / r[1].strip()) for r in rows]
    labels = _records(base / "image_class_labels.txt", "<image id> <integer class id>", (str, int))
    label_of = {r[0]: r[1] for r in labels}
    _require_every(img_ids, label_of, "label", base / "image_class_labels.txt")
    ids = np.asarray([label_of[i] for i in img_ids], dtype=np.int64)
    classes = _records(base / "classes.txt", "<integer class id> <class name>", (int, str), rest=True)
    names = {r[0]: r[1].strip() for r in classes}
    boxes = None
    box_file = base / "bounding_boxes.txt"
    if box_file.exists():
        box_of = {r[0]: r[1:] for r in _records(box_file, "<image id> <x> <y> <width> <height>", (str,) + (float,) * 4)}
        _require_every(img_ids, box_of, "box", box_file)
        xywh = np.asarray([box_of[i] for i in img_ids], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return _split_by_ranges(ids, split_spec, names, paths=paths, boxes=boxes)


# ----------------------------------------------------------------------------- Cars


@register("cars196")
def read_cars196(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """Stanford Cars: devkit ``cars_annos.mat`` (with boxes) or ``images/<class>/`` folders."""
    mat_path = _first_existing(root / "cars_annos.mat", root / "devkit" / "cars_annos.mat")
    if mat_path is None:
        if (root / "images").is_dir():
            return _class_folders(root / "images", split_spec)
        raise UserError(
            f"missing {root / 'cars_annos.mat'} (Stanford Cars needs cars_annos.mat with car_ims/ "
            f"beside it, or a class-folder layout images/<class>/*.jpg)"
        )
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(mat_path), squeeze_me=True)
    except Exception as exc:  # scipy raises several types for a bad file
        raise UserError(f"cannot read {mat_path}: {exc}") from None
    if "annotations" not in mat:
        raise UserError(f"{mat_path} has no 'annotations' (is it the cars_annos.mat of the devkit?)")
    ann = np.atleast_1d(mat["annotations"])
    paths = [str(root / str(p)) for p in ann["relative_im_path"]]
    ids = np.asarray(ann["class"], dtype=np.int64)
    boxes = np.stack(
        [np.asarray(ann[k], dtype=np.float64) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")],
        axis=1,
    )
    names = None
    if "class_names" in mat:
        names = {i: str(n) for i, n in enumerate(np.atleast_1d(mat["class_names"]), start=1)}
    return _split_by_ranges(ids, split_spec, names, paths=paths, boxes=boxes)


# ----------------------------------------------------------------------------- Aircraft


@register("aircraft")
def read_aircraft(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """FGVC-Aircraft 2013b: all trainval+test images, classes = variants.txt order."""
    data = _first_existing(root / "data", root / "fgvc-aircraft-2013b" / "data") or root / "data"
    hint = "FGVC-Aircraft needs data/variants.txt, data/images_variant_{trainval,test}.txt, data/images/"
    variants = _lines(_need(data / "variants.txt", hint))
    vid = {v: i for i, v in enumerate(variants, start=1)}
    img_ids: list[str] = []
    ids: list[int] = []
    for name in ("images_variant_trainval.txt", "images_variant_test.txt"):
        for ln in _lines(_need(data / name, hint)):
            image, variant = ln.split(maxsplit=1)
            if variant not in vid:
                raise UserError(f"variant {variant!r} in {data / name} is not in {data / 'variants.txt'}")
            img_ids.append(image)
            ids.append(vid[variant])
    paths = [str(data / "images" / f"{i}.jpg") for i in img_ids]
    boxes = None
    if (data / "images_box.txt").exists():
        box_of = {r[0]: r[1:5] for r in (ln.split() for ln in _lines(data / "images_box.txt"))}
        boxes = np.asarray([box_of[i] for i in img_ids], dtype=np.float64).reshape(-1, 4)
    names = dict(enumerate(variants, start=1))
    return _split_by_ranges(np.asarray(ids, dtype=np.int64), split_spec, names, paths=paths, boxes=boxes)


# ----------------------------------------------------------------------------- SOP


def _ebay(path: Path, base: Path) -> ImageTable:
    rows = _lines(path)[1:]  # header: image_id class_id super_class_id path
    parts = [r.split() for r in rows]
    ids = np.asarray([p[1] for p in parts], dtype=np.int64)
    return _table(ids, paths=[str(base / p[3]) for p in parts])


@register("sop")
def read_sop(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """Stanford Online Products: ``Info_Files/Ebay_{train,test}.txt``, paths relative to root."""
    base = next((b for b in (root, root / "Stanford_Online_Products") if (b / "Info_Files").is_dir()), root)
    hint = "SOP needs Info_Files/Ebay_train.txt, Info_Files/Ebay_test.txt and the class folders"
    return {
        split: _ebay(_need(base / split_spec.get(f"{split}_file", f"Info_Files/Ebay_{split}.txt"), hint), base)
        for split in ("train", "test")
    }


# ----------------------------------------------------------------------------- In-Shop


@register("inshop")
def read_inshop(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """In-Shop: ``list_eval_partition.txt``; query and gallery share one label space."""
    hint = "In-Shop needs list_eval_partition.txt and img/ beside it"
    lst = _first_existing(root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt")
    lst = _need(lst or root / "list_eval_partition.txt", hint)
    base = next((b for b in (root, root / "Img") if (b / "img").is_dir()), root)
    rows = [ln.split() for ln in _lines(lst)[2:]]  # line 1: count, line 2: header
    by_status: dict[str, list[list[str]]] = {"train": [], "query": [], "gallery": []}
    for r in rows:
        if len(r) < 3 or r[2] not in by_status:
            raise UserError(f"bad line in {lst}: {' '.join(r)!r} (expected: image_name item_id status)")
        by_status[r[2]].append(r)
    if not by_status["train"] or not by_status["query"] or not by_status["gallery"]:
        raise UserError(f"{lst} must list train, query and gallery images")

    out = {}
    train = by_status["train"]
    out["train"] = _table(np.asarray([r[1] for r in train]), paths=[str(base / r[0]) for r in train])
    joint = by_status["query"] + by_status["gallery"]
    table = _table(np.asarray([r[1] for r in joint]), paths=[str(base / r[0]) for r in joint])
    nq = len(by_status["query"])
    # slice without relabelling so query and gallery keep the joint label space
    for name, sl in (("query", slice(0, nq)), ("gallery", slice(nq, None))):
        out[name] = ImageTable(
            labels=table.labels[sl].copy(), class_names=list(table.class_names), paths=table.paths[sl]
        )
    return out


# ----------------------------------------------------------------------------- iNaturalist


@register("inaturalist")
def read_inaturalist(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """VPTSP-G's iNaturalist 2018 lists: one relative path a line; class = parent folder."""
    hint = "iNaturalist needs VPTSP-G's list files and train_val2018/ beside them"
    out = {}
    for split in ("train", "test"):
        lst = _need(root / split_spec.get(f"{split}_file", f"Inaturalist_{split}_set1.txt"), hint)
        rel = _lines(lst)
        cls = [r.rsplit("/", 2)[-2] if r.count("/") >= 1 else "" for r in rel]
        if "" in cls:
            raise UserError(f"bad line in {lst}: {rel[cls.index('')]!r} (expected <class folder>/<image>)")
        prefix = str(root) + "/"
        out[split] = _table(np.asarray(cls), paths=[prefix + r for r in rel])
    return out
