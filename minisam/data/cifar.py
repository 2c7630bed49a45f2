"""CIFAR-10 and CIFAR-100, from tensorflow-datasets or from the standard archives.

Two sources:

* tensorflow-datasets, the source google-research/sam uses
  (`tfds.load('cifar10', split=...)` in `sam_jax/datasets/dataset_source.py`).
  It is an optional extra: `pip install 'minisam[data]'`; imported only when used.
* the "python version" archives from https://www.cs.toronto.edu/~kriz/cifar.html,
  `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`, or their extracted folders
  `cifar-10-batches-py/` / `cifar-100-python/`, read with tarfile + pickle + NumPy
  only. Handy on machines without TensorFlow or network.

They give the same images as uint8 NHWC arrays, but NOT in the same order
(tensorflow-datasets stores examples shuffled by a hash of their key), so the
validation split, the last 10% of the training set, holds different images for
the two sources. Only the tfds source reproduces the JAX code's
'train[45000:]' validation set.

Normalisation constants are copied from the JAX code (see `CIFAR_MEAN_STD`).
"""
from __future__ import annotations

import codecs
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

# Per-channel (RGB) mean and std of the training images scaled to [0, 1], copied
# from google-research/sam sam_jax/datasets/dataset_source.py,
# CifarDatasetSource.__init__ (`self._image_mean` / `self._image_std`).
CIFAR_MEAN_STD = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091),
                (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784),
                 (0.26733429, 0.25643846, 0.27615047)),
}

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# name -> (archive file, folder inside it, train members, test members, label key)
_LAYOUT = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python",
                 ["train"], ["test"], b"fine_labels"),
}


def load_cifar_uint8(name: str, data_dir=None, source: str = "auto"):
    """((train_images, train_labels), (test_images, test_labels)); uint8 NHWC, int32.

    source "auto" reads the archive when `find_archive` finds one in `data_dir`
    and falls back to tensorflow-datasets otherwise; a `data_dir` that does not exist is
    an error (most likely a typo), not a folder for tfds to download into.
    """
    if name not in _LAYOUT:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {tuple(_LAYOUT)}")
    if source == "archive":
        if data_dir is None:
            raise ValueError(f"source='archive' needs data_dir: {_where_to_put(name)}")
        path = find_archive(name, data_dir)
        if path is None:
            raise FileNotFoundError(_not_found_message(name, data_dir))
        return read_archive(name, path)
    if source == "auto":
        if data_dir is not None and not Path(data_dir).expanduser().exists():
            raise FileNotFoundError(_not_found_message(name, data_dir))  # a typo, not a download
        path = find_archive(name, data_dir) if data_dir is not None else None
        if path is not None:
            return read_archive(name, path)
        return load_tfds(name, data_dir, archive_hint=True)
    if source == "tfds":
        return load_tfds(name, data_dir)
    raise ValueError(f"unknown source {source!r}; expected 'auto', 'archive' or 'tfds'")


# ---------------------------------------------------------------------------
# The local archive.


def find_archive(name: str, data_dir):
    """The extracted folder or the .tar.gz for `name` under `data_dir`, else None.

    `data_dir` may be the folder that holds them, the extracted folder itself, or the
    .tar.gz file itself. The extracted folder wins over the archive (faster to read).
    """
    tar_name, folder, *_ = _LAYOUT[name]
    p = Path(data_dir).expanduser()
    if p.is_file():
        return p if p.name == tar_name else None
    if p.is_dir() and p.name == folder:
        return p
    if (p / folder).is_dir():
        return p / folder
    if (p / tar_name).is_file():
        return p / tar_name
    return None


# The published archives' MD5 (as torchvision checks them), to tell a corrupt download.
ARCHIVE_MD5 = {"cifar10": "c58f30108f718f92721af3b95e74349a",
               "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}


def _md5(path) -> str:
    import hashlib
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_archive(name: str, path):
    """``_read_archive``, and when an archive file cannot be read, its MD5 against the
    published one: a truncated or corrupt download is then said to be one."""
    import zlib
    try:
        return _read_archive(name, path)
    except FileNotFoundError as e:  # readable, but without the expected members
        if Path(path).is_file() and (md5 := _md5(path)) != ARCHIVE_MD5[name]:
            raise FileNotFoundError(f"{e}; this file is not the published archive (its MD5 is "
                                    f"{md5}, not {ARCHIVE_MD5[name]}): if it was downloaded, "
                                    "it is corrupt or truncated, download it again") from None
        raise
    except (_Unreadable, EOFError, OSError, zlib.error) as e:
        if not Path(path).is_file():
            raise
        md5 = _md5(path)
        other = [n for n, m in ARCHIVE_MD5.items() if m == md5 and n != name]
        if other:
            raise ValueError(f"{path} is the {other[0]} archive, not {name}'s") from None
        if md5 != ARCHIVE_MD5[name]:
            raise ValueError(f"{path} is corrupt or truncated (its MD5 is {md5}, the published "
                             f"{_LAYOUT[name][0]} has {ARCHIVE_MD5[name]}); download it again "
                             f"from {CIFAR_URL}") from None
        raise ValueError(f"{path} could not be read ({e})") from None


def _read_archive(name: str, path):
    """Read a CIFAR "python version" archive (.tar.gz) or its extracted folder.

    Each member is a pickled dict (written by Python 2): b'data' is uint8 [N, 3072],
    each row the 32x32 red plane, then green, then blue, row-major (CHW); labels are
    under b'labels' (CIFAR-10) or b'fine_labels' (CIFAR-100). We turn rows into
    NHWC [N, 32, 32, 3], the layout tfds (and the JAX code) use.
    """
    _, folder, train_members, test_members, label_key = _LAYOUT[name]
    path = Path(path)
    wanted = train_members + test_members
    if path.is_dir():
        blobs = {}
        for m in wanted:
            f = path / m
            if not f.is_file():
                raise FileNotFoundError(
                    f"{path} is missing {m!r}; a complete {folder}/ holds {wanted}. "
                    f"Re-extract the archive from {CIFAR_URL}")
            blobs[m] = f.read_bytes()
    else:
        blobs = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:  # one pass: seeking back in a .gz re-decompresses it
                    base = member.name.split("/")[-1]
                    if member.isfile() and member.name.startswith(folder + "/") and base in wanted:
                        blobs[base] = tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise _Unreadable(f"{path} is not a readable .tar.gz archive ({e}); "
                             f"expected the CIFAR 'python version' from {CIFAR_URL}") from e
        missing = [m for m in wanted if m not in blobs]
        if missing:
            raise FileNotFoundError(
                f"{path} has no {[f'{folder}/{m}' for m in missing]}; expected the "
                f"{name} 'python version' archive ({_LAYOUT[name][0]}) from {CIFAR_URL}")

    def load(members):
        xs, ys = [], []
        for m in members:
            d = _safe_unpickle(blobs[m], f"{path}:{m}")
            if b"data" not in d or label_key not in d:
                raise ValueError(f"{path}:{m} has keys {sorted(d)}; expected b'data' and "
                                 f"{label_key!r} (is this the {name} archive?)")
            data, labels = np.asarray(d[b"data"]), np.asarray(d[label_key])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                    or len(labels) != len(data):
                raise ValueError(f"{path}:{m}: expected b'data' uint8 [N, 3072] and N labels; "
                                 f"got {data.dtype} {data.shape} and {len(labels)} labels")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW -> HWC
            ys.append(labels.astype(np.int32))
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    return load(train_members), load(test_members)


class _Unreadable(ValueError):
    """A member or the archive itself could not be read (as opposed to: read, but wrong)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and NumPy arrays: a tampered archive cannot run code."""

    _reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: a CIFAR batch holds only "
                "dicts, lists and NumPy arrays") from None


def _safe_unpickle(blob: bytes, where: str) -> dict:
    import io

    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:
        raise _Unreadable(f"{where} is not a CIFAR python-format batch ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{where} holds a {type(d).__name__}, expected a dict")
    return d


def _where_to_put(name: str) -> str:
    tar_name, folder, *_ = _LAYOUT[name]
    return (f"put {tar_name} (the 'python version' from {CIFAR_URL}) or its extracted "
            f"folder {folder}/ in a directory and pass it as data_dir, or install "
            "tensorflow-datasets with `pip install 'minisam[data]'` and use source='tfds'")


def _not_found_message(name: str, data_dir) -> str:
    p = Path(data_dir).expanduser()
    if not p.exists():
        return f"data_dir {str(p)!r} does not exist; {_where_to_put(name)}"
    tar_name, folder, *_ = _LAYOUT[name]
    return f"found neither {tar_name} nor {folder}/ in {str(p)!r}; {_where_to_put(name)}"


# ---------------------------------------------------------------------------
# tensorflow-datasets.


def load_tfds(name: str, data_dir=None, archive_hint: bool = False):
    """Load both CIFAR splits through tensorflow-datasets, as uint8 NHWC arrays.

    Mirrors `CifarDatasetSource.__init__` in google-research/sam, which calls
    `tfds.load(name, split='train' | 'test')` (the validation variant slices
    'train[:45000]' / 'train[45000:]'; `dataset.validation_split` does that slicing
    in NumPy). shuffle_files=False, tfds' default that the JAX code relies on, gives
    the same fixed order on every load, so our last 10% is the JAX code's
    'train[45000:]'. tfds downloads and prepares the data in `data_dir` (tfds'
    default ~/tensorflow_datasets when None) on first use.
    """
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TF's start-up log
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        msg = (f"loading {name} through tensorflow-datasets needs tensorflow and "
               f"tensorflow-datasets ({e}); install them with `pip install 'minisam[data]'`")
        if archive_hint:  # source='auto' found no local archive either
            tar_name, folder, *_ = _LAYOUT[name]
            msg += (f", or put {tar_name} or its extracted {folder}/ (from {CIFAR_URL}) "
                    f"in a directory passed as data_dir (searched: {data_dir})")
        raise ImportError(msg) from e
    try:  # keep TensorFlow off the GPU: CuPy owns it (the flax examples do the same)
        tf.config.set_visible_devices([], "GPU")
    except Exception:
        pass

    def split(s):
        ds = tfds.load(name, split=s, data_dir=None if data_dir is None else str(data_dir),
                       shuffle_files=False)
        xs, ys = [], []
        for batch in tfds.as_numpy(ds.batch(10000)):
            xs.append(batch["image"])
            ys.append(batch["label"])
        if not xs:
            raise ValueError(f"tensorflow-datasets returned an empty {name} {s!r} split")
        return np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int32)

    return split("train"), split("test")
