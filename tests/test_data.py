"""Data layer tests on tiny fake layouts of every dataset (CPU, a few seconds)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness import data
from harness.config import RunConfig
from harness.data import fashion, readers
from harness.data import splits as splits_module
from harness.errors import UserError
from harness.training.setup import splits_for

SMALL = {"train_classes": [1, 3], "test_classes": [4, 6]}


def write_img(path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = 128 if mode == "L" else (200, 30, 60)
    Image.new(mode, size, color).save(path)


def make_cub(root: Path, n_classes: int = 6, per_class: int = 3, images: bool = True) -> Path:
    """Official CUB layout under root/CUB_200_2011 (the reader must find it from root)."""
    base = root / "CUB_200_2011"
    base.mkdir(parents=True)
    imgs, labels, boxes, classes = [], [], [], []
    iid = 0
    for c in range(1, n_classes + 1):
        cname = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {cname}")
        for j in range(per_class):
            iid += 1
            rel = f"{cname}/img_{j}.jpg"
            imgs.append(f"{iid} {rel}")
            labels.append(f"{iid} {c}")
            boxes.append(f"{iid} {1.0 + j} 2.0 5.0 4.0")
            if images:
                write_img(base / "images" / rel)
    for name, rows in [
        ("images.txt", imgs),
        ("image_class_labels.txt", labels),
        ("bounding_boxes.txt", boxes),
        ("classes.txt", classes),
    ]:
        (base / name).write_text("\n".join(rows) + "\n")
    return base


def cfg_for(dataset: str, root: Path, **data_kw) -> RunConfig:
    cfg = RunConfig(dataset=dataset)
    cfg.data.root = str(root)
    cfg.data.num_workers = 0
    cfg.data.image_size = 16
    cfg.data.resize_size = 18
    for k, v in data_kw.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.fixture
def small_split(monkeypatch):
    """Make get_spec(name) return the real spec with a scaled-down class split."""
    real = data.get_spec

    def patch(split: dict) -> None:
        monkeypatch.setattr(splits_module, "get_spec", lambda n: dataclasses.replace(real(n), split=split))

    return patch


# ----------------------------------------------------------------------------- specs


def test_specs_load_with_protocol_ks():
    names = data.spec_names()
    assert {"cub200", "cars196", "aircraft", "sop", "inshop", "inaturalist", "fashion_mnist"} <= set(names)
    for n in names:
        spec = data.get_spec(n)
        assert spec.name == n and spec.reader in readers.READERS and spec.how_to_get
    assert data.get_spec("sop").ks == [1, 10, 100]
    assert data.get_spec("inshop").query_gallery and data.get_spec("inshop").ks == [1, 10, 20, 30, 40, 50]
    assert data.get_spec("fashion_mnist").defaults["data"]["val_fraction"] == 0.4
    with pytest.raises(UserError, match="unknown dataset 'cub'"):
        data.get_spec("cub")


# ----------------------------------------------------------------------------- readers


def assert_disjoint(out: dict) -> None:
    names = [set(t.class_names) for t in out.values()]
    assert not (names[0] & names[1])
    for t in out.values():
        assert t.labels.dtype == np.int64 and set(t.labels.tolist()) == set(range(t.num_classes))


def test_cub_official_layout_and_boxes(tmp_path):
    make_cub(tmp_path, images=False)
    out = readers.read_cub200(tmp_path, SMALL)
    assert (len(out["train"]), out["train"].num_classes) == (9, 3)
    assert (len(out["test"]), out["test"].num_classes) == (9, 3)
    assert_disjoint(out)
    assert out["train"].class_names[0] == "001.Bird_1"
    np.testing.assert_allclose(out["train"].boxes[1], [2.0, 2.0, 7.0, 6.0])  # x y w h -> x0 y0 x1 y1
    assert out["train"].paths[0].endswith("CUB_200_2011/images/001.Bird_1/img_0.jpg")


def test_cub_class_folder_layout(tmp_path):
    for c in range(6):
        for j in range(2):
            write_img(tmp_path / "images" / f"{c:03d}.B{c}" / f"{j}.jpg")
    out = readers.read_cub200(tmp_path, SMALL)
    assert out["train"].class_names == ["000.B0", "001.B1", "002.B2"]
    assert len(out["test"]) == 6 and out["train"].boxes is None


def test_cars_devkit_and_folders(tmp_path):
    import scipy.io

    dt = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    rows = [(f"car_ims/{i:06d}.jpg", 1 + i, 2, 30 + i, 40, 1 + i % 6, i % 2) for i in range(12)]
    ann = np.array(rows, dtype=dt)
    names = np.array([f"Car {c}" for c in range(1, 7)], dtype=object)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": ann, "class_names": names})
    out = readers.read_cars196(tmp_path, SMALL)
    assert len(out["train"]) == 6 and out["train"].class_names == ["Car 1", "Car 2", "Car 3"]
    assert_disjoint(out)
    np.testing.assert_allclose(out["train"].boxes[0], [1, 2, 30, 40])
    assert out["train"].paths[0] == str(tmp_path / "car_ims/000000.jpg")

    folders = tmp_path / "f"
    for c in range(6):
        write_img(folders / "images" / f"Model {c}" / "a.jpg")
    out = readers.read_cars196(folders, SMALL)
    assert out["test"].class_names == ["Model 3", "Model 4", "Model 5"]


def test_aircraft_variants_with_spaces_and_boxes(tmp_path):
    d = tmp_path / "fgvc-aircraft-2013b" / "data"
    d.mkdir(parents=True)
    variants = ["Boeing 737-200", "A320", "Cessna 172", "DC-3", "Fokker 100", "Hawk T1"]
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    tv, te, box = [], [], []
    for i in range(12):
        (tv if i % 2 else te).append(f"{1000 + i:07d} {variants[i % 6]}")
        box.append(f"{1000 + i:07d} 1 2 {10 + i} 20")
    (d / "images_variant_trainval.txt").write_text("\n".join(tv) + "\n")
    (d / "images_variant_test.txt").write_text("\n".join(te) + "\n")
    (d / "images_box.txt").write_text("\n".join(box) + "\n")
    out = readers.read_aircraft(tmp_path, SMALL)
    assert out["train"].class_names == variants[:3] and len(out["train"]) == 6 and len(out["test"]) == 6
    i = out["train"].paths.index(str(d / "images" / "0001000.jpg"))
    np.testing.assert_allclose(out["train"].boxes[i], [1, 2, 10, 20])


def test_sop(tmp_path):
    info = tmp_path / "Info_Files"
    info.mkdir()
    head = "image_id class_id super_class_id path\n"
    (info / "Ebay_train.txt").write_text(
        head + "".join(f"{i} {1 + i // 2} 1 bicycle_final/{i}.JPG\n" for i in range(1, 7))
    )
    (info / "Ebay_test.txt").write_text(
        head + "".join(f"{i} {10 + i // 3} 2 chair_final/{i}.JPG\n" for i in range(7, 13))
    )
    out = readers.read_sop(tmp_path, {})
    assert len(out["train"]) == 6 and out["train"].num_classes == 4
    assert len(out["test"]) == 6 and out["test"].num_classes == 3
    assert_disjoint(out)
    assert out["test"].paths[0] == str(tmp_path / "chair_final/7.JPG")


def test_inshop_query_gallery_share_labels(tmp_path):
    rows = [
        ("img/MEN/a/id_00000001/01.jpg", "id_00000001", "train"),
        ("img/MEN/a/id_00000001/02.jpg", "id_00000001", "train"),
        ("img/MEN/b/id_00000002/01.jpg", "id_00000002", "train"),
        ("img/WOMEN/c/id_00000007/01.jpg", "id_00000007", "query"),
        ("img/WOMEN/d/id_00000009/01.jpg", "id_00000009", "query"),
        ("img/WOMEN/c/id_00000007/02.jpg", "id_00000007", "gallery"),
        ("img/WOMEN/d/id_00000009/02.jpg", "id_00000009", "gallery"),
        ("img/WOMEN/e/id_00000011/02.jpg", "id_00000011", "gallery"),
    ]
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{a} {b} {c}\n" for a, b, c in rows)
    (tmp_path / "list_eval_partition.txt").write_text(text)
    out = readers.read_inshop(tmp_path, {})
    q, g = out["query"], out["gallery"]
    assert (len(out["train"]), out["train"].num_classes) == (3, 2)
    assert q.class_names == g.class_names
    assert [q.class_names[i] for i in q.labels] == ["id_00000007", "id_00000009"]
    assert [g.class_names[i] for i in g.labels] == ["id_00000007", "id_00000009", "id_00000011"]
    assert q.paths[0] == str(tmp_path / "img/WOMEN/c/id_00000007/01.jpg")


def test_inaturalist_lists(tmp_path):
    (tmp_path / "Inaturalist_train_set1.txt").write_text(
        "train_val2018/Plantae/7477/a.jpg\ntrain_val2018/Plantae/7477/b.jpg\ntrain_val2018/Aves/12/c.jpg\n"
    )
    (tmp_path / "Inaturalist_test_set1.txt").write_text("train_val2018/Fungi/900/d.jpg\n")
    out = readers.read_inaturalist(tmp_path, data.get_spec("inaturalist").split)
    assert sorted(out["train"].class_names) == ["12", "7477"] and len(out["train"]) == 3
    assert out["train"].paths[0] == str(tmp_path / "train_val2018/Plantae/7477/a.jpg")
    assert out["test"].class_names == ["900"]


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_pools_and_splits_by_class(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    out = fashion.read_fashion_mnist(tmp_path, data.get_spec("fashion_mnist").split)
    assert len(out["train"]) == 20 and len(out["test"]) == 20
    assert out["train"].array.shape == (20, 28, 28) and out["train"].class_names[0] == "T-shirt/top"


def test_fashion_files_are_decoded_once_per_process_and_again_when_replaced(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def write(value: int) -> None:
        for prefix, n in (("train", 30), ("t10k", 10)):
            write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 28, 28), value))
            write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.permutation(np.arange(n) % 10))

    write(7)
    reads: list[str] = []
    real_read = fashion.read_idx
    monkeypatch.setattr(fashion, "read_idx", lambda path: reads.append(path.name) or real_read(path))
    spec = data.get_spec("fashion_mnist").split
    first = fashion.read_fashion_mnist(tmp_path, spec)
    again = fashion.read_fashion_mnist(tmp_path, spec)
    styles = fashion.read_fashion_styles(tmp_path, data.get_spec("fashion_styles").split)
    assert len(reads) == 4  # four idx files, one decode for every reader and every call
    assert len(styles["train"]) + len(styles["test"]) == 40
    images, _ = fashion.load_fashion(tmp_path)
    assert not images.flags.writeable  # the kept arrays are shared: a caller cannot change them
    assert first["train"].array.flags.writeable  # a split is its own copy
    first["train"].array[:] = 0
    assert (again["train"].array == 7).all()
    write(9)  # a replaced file (another size or mtime) is decoded again
    os.utime(tmp_path / "train-images-idx3-ubyte.gz", ns=(1, 1))
    assert (fashion.read_fashion_mnist(tmp_path, spec)["train"].array == 9).all()
    assert len(reads) == 8


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").exists(), reason="no Fashion-MNIST")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)
    cfg = RunConfig(dataset="fashion_mnist")
    cfg.data.val_fraction = 0.4
    s = splits_for(cfg)
    assert len(s.train) + len(s.val) + len(s.test) == 70_000
    assert s.train.num_classes + s.val.num_classes == 5 and s.val.num_classes == 2
    assert len(s.test) == 35_000 and s.test.num_classes == 5
    assert s.train.array.dtype == np.uint8 and s.train.array.shape[1:] == (28, 28)


# ----------------------------------------------------------------------------- splitting


@pytest.fixture
def cub20(tmp_path, small_split):
    """20 train + 4 test classes of 5 images each (list files only)."""
    make_cub(tmp_path, n_classes=24, per_class=5, images=False)
    small_split({"train_classes": [1, 20], "test_classes": [21, 24]})
    return tmp_path


def test_val_split_is_seeded_held_out_train_classes(cub20):
    s0 = splits_for(cfg_for("cub200", cub20, val_fraction=0.2))
    assert s0.val.num_classes == 4 and s0.train.num_classes == 16 and s0.test.num_classes == 4
    assert not set(s0.val.class_names) & set(s0.train.class_names)
    assert not set(s0.val.class_names) & set(s0.test.class_names)
    assert int(s0.val.class_names[0].split(".")[0]) <= 20
    again = splits_for(cfg_for("cub200", cub20, val_fraction=0.2))
    assert again.val.class_names == s0.val.class_names
    other = RunConfig(dataset="cub200", seed=1, data=cfg_for("cub200", cub20, val_fraction=0.2).data)
    assert splits_for(other).val.class_names != s0.val.class_names
    assert splits_for(cfg_for("cub200", cub20, val_fraction=0.0)).val is None
    assert splits_for(cfg_for("cub200", cub20, val_fraction=0.01)).val.num_classes == 1
    assert s0.ks == (1, 2, 4, 8)


def test_shots_max_per_class_max_classes(cub20):
    s = splits_for(cfg_for("cub200", cub20, shots=2))
    assert len(s.train) == 2 * s.train.num_classes and len(s.val) == 5 * s.val.num_classes
    s = splits_for(cfg_for("cub200", cub20, max_per_class=3))
    for t in (s.train, s.val, s.test):
        assert np.bincount(t.labels).max() == 3
    s = splits_for(cfg_for("cub200", cub20, max_classes=10, val_fraction=0.2))
    assert s.train.num_classes + s.val.num_classes == 10 and s.test.num_classes == 4


def test_subset_relabels_contiguously():
    t = data.ImageTable(labels=np.array([0, 1, 2, 2]), class_names=["a", "b", "c"], paths=list("wxyz"))
    sub = t.subset([3, 0])
    assert sub.labels.tolist() == [1, 0] and sub.class_names == ["a", "c"] and sub.paths == ["z", "w"]


# ----------------------------------------------------------------------------- errors


def test_missing_folder_names_paths_tried(tmp_path, monkeypatch):
    spec = data.get_spec("cub200")
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        data.resolve_root(spec, str(tmp_path / "nope"))
    monkeypatch.setenv("DMLBENCH_DATA", str(tmp_path / "store"))
    with pytest.raises(UserError) as exc:
        data.resolve_root(spec)
    msg = str(exc.value)
    assert str(tmp_path / "store" / "cub200") in msg and "data.root" in msg and "caltech" in msg
    assert "\n" not in msg


def test_incomplete_layout_names_missing_file(tmp_path):
    base = make_cub(tmp_path, images=False)
    (base / "images.txt").unlink()
    with pytest.raises(UserError, match="images.txt"):
        data.check_dataset("cub200", str(tmp_path))


def test_corrupt_image_is_named(tmp_path, small_split):
    base = make_cub(tmp_path, n_classes=6, per_class=2)
    small_split(SMALL)
    bad = base / "images" / "005.Bird_5" / "img_1.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match=str(bad)):
        data.check_dataset("cub200", str(tmp_path))
    counts = data.check_dataset("cub200", str(tmp_path), verify_images=False)
    assert counts["test"] == {"images": 6, "classes": 3} and counts["val"]["classes"] == 1
    s = splits_for(cfg_for("cub200", tmp_path))
    ds = data.ImageDataset(s.test, None)
    with pytest.raises(UserError, match=str(bad)):
        ds[s.test.paths.index(str(bad))]
    img, label, idx = ds[0]
    assert img.size == (12, 10) and label == 0 and idx == 0


# ----------------------------------------------------------------------------- sampler


def test_class_balanced_sampler():
    labels = np.repeat(np.arange(10), [7, 7, 7, 7, 7, 7, 7, 7, 7, 1])
    s = data.ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=4, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == len(labels) // 8
    for b in batches:
        assert len(b) == 8
        groups = [labels[b[i : i + 4]] for i in range(0, 8, 4)]
        assert all(len(set(g)) == 1 for g in groups)  # m consecutive same-class images
        assert groups[0][0] != groups[1][0]
    assert list(data.ClassBalancedBatchSampler(labels, 8, 4, seed=3)) == batches
    s.set_epoch(1)
    assert list(s) != batches
    assert list(data.ClassBalancedBatchSampler(labels, 8, 4, seed=4)) != batches
    few = data.ClassBalancedBatchSampler(np.array([0, 0, 1]), batch_size=8, samples_per_class=4)
    assert len(next(iter(few))) == 8  # more classes per batch than exist, small classes replaced


# ----------------------------------------------------------------------------- transforms/loaders


@pytest.mark.parametrize("augment", ["standard", "frpt", "none"])
def test_transforms_make_three_channel_uint8_normalised_on_the_device(augment):
    """Workers hand over uint8 crops (4x less to move than float32); the batch is normalised on
    the device."""
    cfg = cfg_for("cub200", Path("."), augment=augment)
    gray = np.full((28, 28), 100, np.uint8)
    for train in (True, False):
        tf = data.make_transform(cfg.data, train)
        for x in (gray, Image.fromarray(gray), Image.new("RGB", (30, 20))):
            y = tf(x)
            assert y.shape == (3, 16, 16) and y.dtype == torch.uint8
    y = data.make_transform(cfg.data, False)(gray)
    normalise = data.BatchTransform.from_config(
        cfg.data, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), False, geometry=False
    )
    z = normalise(y[None], np.random.default_rng(0))
    assert torch.allclose(z, torch.full_like(z, (100 / 255 - 0.5) / 0.25), atol=1e-5)


def test_make_loaders(tmp_path, small_split):
    make_cub(tmp_path, n_classes=6, per_class=4)
    small_split(SMALL)
    cfg = cfg_for("cub200", tmp_path, batch_size=4, samples_per_class=2, cache_images=True)
    cfg.eval.batch_size = 5
    s = splits_for(cfg)
    loaders = data.make_loaders(s, cfg.data, cfg.seed, cfg.eval.batch_size, (0.5,) * 3, (0.5,) * 3, "cpu")
    assert set(loaders) == {"train", "val", "test"}
    x, y, idx = next(iter(loaders["train"]))
    assert x.shape == (4, 3, 16, 16) and y[0] == y[1] and y[2] == y[3]
    data.set_epoch(loaders["train"], 2)
    batches = list(loaders["test"])
    assert [len(b[0]) for b in batches] == [5, 5, 2] and batches[0][2].tolist() == [0, 1, 2, 3, 4]
    cfg.data.samples_per_class = 0
    plain = data.make_loaders(s, cfg.data, cfg.seed, cfg.eval.batch_size, (0.5,) * 3, (0.5,) * 3, "cpu")["train"]
    assert all(len(b[0]) == 4 for b in plain)


def test_image_cache_gives_the_same_crops_from_the_original_resolution(tmp_path):
    """The cache keeps the encoded files: the same seed gives the same random crops, cached or
    not, from the full-resolution image (not a downsized copy), boxes included."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):  # textured images, so different crops give different pixels
        paths.append(str(tmp_path / f"img_{i}.jpg"))
        Image.fromarray(rng.integers(0, 255, (40 + i, 30, 3), dtype=np.uint8)).save(paths[-1])
    table = data.ImageTable(
        labels=np.array([0, 0, 0, 1, 1, 1]),
        class_names=["a", "b"],
        paths=paths,
        boxes=np.array([[1, 2, 6, 7]] * len(paths), dtype=float),
    )
    cfg = RunConfig()
    cfg.data.image_size, cfg.data.resize_size = 8, 10
    tf = data.make_transform(cfg.data, train=True)
    for crop in (False, True):
        plain = data.ImageDataset(table, tf, cache=False, crop_to_box=crop)
        cached = data.ImageDataset(table, tf, cache=True, crop_to_box=crop)
        assert plain.cache_bytes == 0 and cached.cache_bytes == sum(Path(p).stat().st_size for p in paths)
        for i in range(len(paths)):
            torch.manual_seed(i)
            a = plain[i][0]
            torch.manual_seed(i)
            assert torch.equal(a, cached[i][0])
            assert not torch.equal(a, cached[i][0])  # the crops are random: a different draw differs
    raw = data.ImageDataset(table, None, cache=True)
    assert raw[0][0].size == Image.open(paths[0]).size  # full resolution, not resized
    Path(paths[1]).write_bytes(b"garbage")
    with pytest.raises(UserError, match="img_1.jpg"):
        data.ImageDataset(table, None, cache=True)[1]
