"""Datasets: CIFAR archive reader, tensorflow-datasets (mock_data), digits, synthetic."""
import io
import pickle
import sys
import tarfile

import numpy as np
import pytest

from minisam.data import (CIFAR_MEAN_STD, DATASETS, Dataset, load_dataset, normalize,
                          resize_bilinear, synthetic, validation_split)
from minisam.data import cifar, digits

# ---------------------------------------------------------------------------
# A tiny archive in the real CIFAR "python version" format.

LAYOUT = {  # name -> (tar name, folder, train members, test members, label key)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"],
                 b"fine_labels"),
}


def _batch_dict(images_nhwc, labels, name, member):
    """A batch dict exactly like the real pickles: rows are CHW-planar uint8 [N, 3072]."""
    n = len(images_nhwc)
    d = {b"batch_label": f"{member} of fake".encode(),
         b"data": images_nhwc.transpose(0, 3, 1, 2).reshape(n, 3072),
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if name == "cifar10":
        d[b"labels"] = [int(v) for v in labels]  # a Python list in the real files
    else:
        d[b"fine_labels"] = [int(v) for v in labels]
        d[b"coarse_labels"] = [int(v) // 5 for v in labels]
    return d


def py2_pickle(obj):
    """Pickle like the real files: protocol 2, arrays under numpy.core (NumPy 1 / Python 2)."""
    blob = pickle.dumps(obj, protocol=2)
    return blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def make_cifar(tmp_path, name, per_member=6, extracted=False, seed=0):
    """Write a fake archive (or extracted folder); return the expected uint8 NHWC data."""
    tar_name, folder, train_m, test_m, _ = LAYOUT[name]
    k = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    members, expect = {}, {"train": ([], []), "test": ([], [])}
    for split, names in (("train", train_m), ("test", test_m)):
        for m in names:
            x = rng.integers(0, 256, (per_member, 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, k, per_member)
            members[m] = py2_pickle(_batch_dict(x, y, name, m))
            expect[split][0].append(x)
            expect[split][1].append(y)
    meta = py2_pickle({b"label_names": [b"a"] * k})
    members["batches.meta" if name == "cifar10" else "meta"] = meta
    if extracted:
        d = tmp_path / folder
        d.mkdir()
        for m, blob in members.items():
            (d / m).write_bytes(blob)
    else:
        with tarfile.open(tmp_path / tar_name, "w:gz") as tar:
            for m, blob in list(members.items()) + [("readme.html", b"<html/>")]:
                info = tarfile.TarInfo(f"{folder}/{m}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return {s: (np.concatenate(v[0]), np.concatenate(v[1])) for s, v in expect.items()}


def test_cifar_constants_are_the_jax_ones():
    # google-research/sam sam_jax/datasets/dataset_source.py, CifarDatasetSource.
    assert CIFAR_MEAN_STD["cifar10"] == ((0.49139968, 0.48215841, 0.44653091),
                                         (0.24703223, 0.24348513, 0.26158784))
    assert CIFAR_MEAN_STD["cifar100"] == ((0.50707516, 0.48654887, 0.44091784),
                                          (0.26733429, 0.25643846, 0.27615047))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("extracted", [False, True])
def test_archive_reader(tmp_path, name, extracted):
    expect = make_cifar(tmp_path, name, extracted=extracted)
    (x_tr, y_tr), (x_te, y_te) = cifar.load_cifar_uint8(name, tmp_path, "archive")
    assert x_tr.dtype == np.uint8 and x_tr.shape == expect["train"][0].shape
    np.testing.assert_array_equal(x_tr, expect["train"][0])  # batches 1..5 in order
    np.testing.assert_array_equal(y_tr, expect["train"][1])  # fine labels for CIFAR-100
    np.testing.assert_array_equal(x_te, expect["test"][0])
    np.testing.assert_array_equal(y_te, expect["test"][1])

    train, test = load_dataset(name, data_dir=tmp_path, source="archive")
    mean, std = CIFAR_MEAN_STD[name]
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.images.shape == (len(y_tr), 32, 32, 3)
    assert train.num_classes == (10 if name == "cifar10" else 100)
    want = (expect["test"][0].astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(test.images, want, rtol=1e-6, atol=1e-6)
    assert (train.split, test.split) == ("train", "test")


def test_archive_pixel_placement(tmp_path):
    """Row layout is red plane, green plane, blue plane, each 32x32 row-major."""
    tar_name, folder, train_m, test_m, _ = LAYOUT["cifar10"]
    d = tmp_path / folder
    d.mkdir()
    for m in train_m + test_m:
        data = np.zeros((2, 3072), np.uint8)
        data[1, 0 * 1024 + 3 * 32 + 5] = 11  # red at (y=3, x=5) of image 1
        data[1, 1 * 1024 + 0 * 32 + 31] = 22  # green at (y=0, x=31)
        data[1, 2 * 1024 + 31 * 32 + 0] = 33  # blue at (y=31, x=0)
        (d / m).write_bytes(py2_pickle({b"data": data, b"labels": [1, 2]}))
    (x_tr, _), _ = cifar.load_cifar_uint8("cifar10", d, "archive")  # data_dir = the folder
    img = x_tr[1]
    assert img[3, 5, 0] == 11 and img[0, 31, 1] == 22 and img[31, 0, 2] == 33
    assert img.sum() == 66 and x_tr[0].sum() == 0


def test_archive_file_path_and_auto(tmp_path):
    expect = make_cifar(tmp_path, "cifar10", per_member=2)
    tar = tmp_path / "cifar-10-python.tar.gz"
    (x, _), _ = cifar.load_cifar_uint8("cifar10", tar, "archive")  # data_dir = the .tar.gz
    np.testing.assert_array_equal(x, expect["train"][0])
    train, _ = load_dataset("cifar10", data_dir=tmp_path)  # auto finds the archive, no tfds
    assert len(train) == 10


def test_archive_validation_split(tmp_path):
    expect = make_cifar(tmp_path, "cifar10", per_member=6)  # 30 train images
    train, val = load_dataset("cifar10", data_dir=tmp_path, source="archive", validation=True)
    assert (len(train), len(val), val.split) == (27, 3, "validation")
    np.testing.assert_array_equal(val.labels, expect["train"][1][27:])
    np.testing.assert_array_equal(train.labels, expect["train"][1][:27])


def test_archive_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "nope", source="archive")
    # "auto" too: a folder that does not exist is a typo, not somewhere for tfds to download to
    with pytest.raises(FileNotFoundError, match="does not exist.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "nope", source="auto")
    assert not (tmp_path / "nope").exists()
    make_cifar(tmp_path, "cifar10", per_member=1, extracted=True)
    # A CIFAR-10 folder is the wrong folder for CIFAR-100.
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz nor cifar-100-python/"):
        load_dataset("cifar100", data_dir=tmp_path, source="archive")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("cifar10", source="archive")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing 'data_batch_3'"):
        load_dataset("cifar10", data_dir=tmp_path, source="archive")


def test_archive_member_missing_and_bad_contents(tmp_path):
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        blob = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]})
        info = tarfile.TarInfo("cifar-100-python/train")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(FileNotFoundError, match="cifar-100-python/test"):
        load_dataset("cifar100", data_dir=tmp_path, source="archive")

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    good = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2)
    for m in LAYOUT["cifar10"][2] + LAYOUT["cifar10"][3]:
        (d / m).write_bytes(good)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 100), np.uint8),
                                                 b"labels": [0]}))
    with pytest.raises(ValueError, match=r"expected b'data' uint8 \[N, 3072\]"):
        load_dataset("cifar10", data_dir=tmp_path, source="archive")

    class Evil:  # a pickle that would run code on load
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        load_dataset("cifar10", data_dir=tmp_path, source="archive")


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; expected one of"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown source 'web'"):
        load_dataset("cifar10", source="web")
    with pytest.raises(ValueError, match="image_size=64 is not supported"):
        load_dataset("cifar10", image_size=64)
    with pytest.raises(TypeError, match="only 'synthetic' takes extra"):
        load_dataset("digits", num_train=3)
    assert DATASETS == ("cifar10", "cifar100", "digits", "synthetic")


def test_tfds_missing_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r"pip install 'minisam\[data\]'"):
        load_dataset("cifar10", source="tfds")
    # auto with an empty data_dir: the message also says where to put the archive.
    with pytest.raises(ImportError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path)


# ---------------------------------------------------------------------------
# tensorflow-datasets, through its own mock_data (no network, no download).


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_tfds_mock_data(name):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    with tfds.testing.mock_data(num_examples=20):
        raw = list(tfds.as_numpy(tfds.load(name, split="test", shuffle_files=False).batch(100)))[0]
        train, test = load_dataset(name, source="tfds")
        train_v, val = load_dataset(name, validation=True)  # auto, no data_dir -> tfds
    k = 10 if name == "cifar10" else 100
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (20, 32, 32, 3)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.num_classes == k and 0 <= train.labels.min() and train.labels.max() < k
    mean, std = CIFAR_MEAN_STD[name]
    np.testing.assert_allclose(test.images, normalize(raw["image"], mean, std))
    np.testing.assert_array_equal(test.labels, raw["label"])  # 'label' = fine label
    assert (len(train_v), len(val)) == (18, 2)
    np.testing.assert_array_equal(val.images, train.images[18:])


# ---------------------------------------------------------------------------
# Normalisation, resizing, digits, synthetic.


def test_normalize_per_channel():
    x = np.zeros((1, 1, 2, 3), np.uint8)
    x[0, 0, 1] = [255, 0, 51]
    out = normalize(x, (0.5, 0.25, 0.2), (0.5, 0.25, 0.1))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [-1, -1, -2], rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], [1, -1, 0], atol=1e-6)


def test_resize_bilinear():
    row = np.array([0.0, 1.0], np.float32).reshape(1, 1, 2, 1) * np.ones((1, 2, 1, 1), np.float32)
    out = resize_bilinear(row, 4)  # half-pixel centres: [0, .25, .75, 1] along x
    np.testing.assert_allclose(out[0, 0, :, 0], [0, 0.25, 0.75, 1])
    np.testing.assert_allclose(out[0, :, 1, 0], 0.25)
    const = np.full((2, 8, 8, 1), 3.0, np.float32)
    np.testing.assert_allclose(resize_bilinear(const, 13), 3.0, rtol=1e-6)
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(resize_bilinear(x, 8), x, rtol=1e-6)  # same size: identity


def test_digits():
    train, test = load_dataset("digits")
    assert train.images.shape == (1440, 16, 16, 1) and test.images.shape == (357, 16, 16, 1)
    assert train.images.dtype == np.float32 and train.num_classes == 10
    assert abs(train.images.mean()) < 1e-5 and abs(train.images.std() - 1) < 1e-5
    assert np.bincount(test.labels, minlength=10).min() >= 33  # near-balanced fixed split
    raw, labels = digits.load_digits_raw()
    assert raw.shape == (1797, 8, 8) and raw.max() == 16
    np.testing.assert_array_equal(test.labels, labels[1440:])
    # Native size: pixels / 16, normalised by the training set's mean and std.
    tr8, te8 = load_dataset("digits", image_size=8)
    x = raw[:, :, :, None] / 16.0
    m, s = x[:1440].mean(), x[:1440].std()
    np.testing.assert_allclose(tr8.images, (x[:1440] - m) / s, atol=1e-5)
    np.testing.assert_allclose(te8.images, (x[1440:] - m) / s, atol=1e-5)
    tr32, _ = load_dataset("digits", image_size=32)
    assert tr32.images.shape == (1440, 32, 32, 1)
    t2, v2 = load_dataset("digits", validation=True)
    assert (len(t2), len(v2)) == (1296, 144)
    np.testing.assert_array_equal(v2.images, train.images[1296:])  # same normalisation
    with pytest.raises(ValueError, match="positive int"):
        load_dataset("digits", image_size=0)


def test_synthetic():
    a = synthetic(50, (8, 6, 2), num_classes=4, seed=3)
    b = synthetic(50, (8, 6, 2), num_classes=4, seed=3)
    c = synthetic(50, (8, 6, 2), num_classes=4, seed=4)
    assert a.images.shape == (50, 8, 6, 2) and a.images.dtype == np.float32
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert set(np.unique(a.labels)) <= set(range(4))
    train, test = load_dataset("synthetic", num_train=40, num_test=10, image_shape=(4, 4, 3),
                               num_classes=3, seed=1)
    assert (len(train), len(test), train.image_shape) == (40, 10, (4, 4, 3))
    with pytest.raises(TypeError, match="unexpected arguments"):
        load_dataset("synthetic", num_trian=4)
    with pytest.raises(ValueError, match="image_shape"):
        synthetic(4, (4, 4))


def test_dataset_checks_and_label_noise():
    x = np.zeros((4, 2, 2, 1), np.float64)
    ds = Dataset(x, np.array([0, 1, 2, 1]), 3, "toy")
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32 and len(ds) == 4
    with pytest.raises(ValueError, match="NHWC"):
        Dataset(np.zeros((4, 2, 2)), np.zeros(4), 3, "toy")
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        Dataset(x, np.zeros(3), 3, "toy")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        Dataset(x, np.array([0, 1, 3, 0]), 3, "toy")
    train, _ = load_dataset("digits")
    n1, n2 = train.with_label_noise(0.5, seed=1), train.with_label_noise(0.5, seed=1)
    np.testing.assert_array_equal(n1.labels, n2.labels)
    assert 0.3 < np.mean(n1.labels != train.labels) < 0.6
    assert n1.images is train.images  # images shared, labels replaced


def test_validation_split_slices_last_tenth():
    x, y = np.arange(25)[:, None], np.arange(25)
    (a, b), (c, d) = validation_split(x, y)
    assert b.tolist() == list(range(23)) and d.tolist() == [23, 24]
