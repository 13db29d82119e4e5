"""Tiny data files in each data set's original download format, for running the real loaders without the data.

The writers make the files the real downloads hold (gzipped IDX, CIFAR-10's pickled python batches,
the aclImdb tree, GloVe's text vectors, aligned CelebA jpgs and its annotation files);
:func:`write_original_downloads` packs them as the downloads come (``cifar-10-python.tar.gz``,
``aclImdb_v1.tar.gz``, ``glove.6B.zip``) into one data folder and writes the md5s of its files as
the JSON that ``companion.data.CHECKSUMS_ENV`` takes. Used by tests/test_data.py and by the
notebook tests (tests/conftest.py's ``original_format_data``).
"""
import gzip
import hashlib
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REVIEWS = {
    ("train", "pos"): ["A great movie.<br /><br />Loved it!", "Wonderful, isn't it?", "GREAT great"],
    ("train", "neg"): ["Bad film. It's awful", "boring"],
    ("test", "pos"): ["great"],
    ("test", "neg"): ["awful awful"],
}


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_idx(path, array):
    """Gzipped IDX file: magic 0x0000080<ndim> (ubyte), big-endian sizes, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def make_idx_files(folder, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
              "test": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))}
    for (split, (x, y)), prefix in zip(arrays.items(), ("train", "t10k")):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return arrays


def make_cifar_tree(root, n=4, seed=0):
    """The python batches: pickled dicts with 'data' (N, 3072) uint8 rows (1024 R,
    1024 G, 1024 B values, row-major) and 'labels'. The originals are Python-2
    pickles whose str keys torchvision reads back as str (encoding='latin1')."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(), "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"], "num_cases_per_batch": n}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, batches


def make_celeba_tree(root, partitions=(0, 0, 0, 1, 2, 2)):
    """Aligned-CelebA-sized jpgs (178 x 218): black, with the central 140 x 140
    square in a grey level particular to each image, + the five annotation files."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    levels = [40 + (35 * i) % 200 for i in range(len(partitions))]
    for name, level in zip(names, levels):
        img = np.zeros((218, 178, 3), dtype=np.uint8)
        img[39:179, 19:159] = level
        Image.fromarray(img).save(folder / "img_align_celeba" / name, quality=100, subsampling=0)
    attrs = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling"]
    lines = {
        "list_eval_partition.txt": [f"{n} {p}" for n, p in zip(names, partitions)],
        "list_attr_celeba.txt": [str(len(names)), " ".join(attrs)] + [f"{n}  -1  1 -1" for n in names],
        "identity_CelebA.txt": [f"{n} {i + 7}" for i, n in enumerate(names)],
        "list_bbox_celeba.txt": [str(len(names)), "image_id x_1 y_1 width height"]
        + [f"{n}  95  71 226 313" for n in names],
        "list_landmarks_align_celeba.txt": [str(len(names)), "lefteye_x lefteye_y righteye_x righteye_y nose_x "
                                            "nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"]
        + [f"{n}  69 109 106 113 77 142 73 152 108 154" for n in names],
    }
    for fname, rows in lines.items():
        (folder / fname).write_text("\n".join(rows) + "\n")
    return folder, levels


def make_imdb_tree(root, reviews=None):
    for (split, kind), texts in (reviews or REVIEWS).items():
        folder = root / "aclImdb" / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (folder / f"{i}_{8 if kind == 'pos' else 2}.txt").write_text(text, encoding="utf-8")
    unsup = root / "aclImdb" / "train" / "unsup"
    unsup.mkdir()
    (unsup / "0_0.txt").write_text("unlabelled", encoding="utf-8")


def write_glove_txt(path, words, vectors):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for w, v in zip(words, vectors):
            fh.write(w + " " + " ".join(f"{x:.6f}" for x in v.tolist()) + "\n")


# ----------------------------------------------------------------------------- the downloads, packed

def _reviews(n_per_class, words, seed):
    """``n_per_class`` short reviews per split and label, built from GloVe's words (so most tokens are known)."""
    rng = np.random.default_rng(seed)
    return {(split, kind): [" ".join(rng.choice(words, size=int(rng.integers(3, 12))))
                            + (" great" if kind == "pos" else " awful") for _ in range(n_per_class)]
            for split in ("train", "test") for kind in ("pos", "neg")}


def write_original_downloads(root, n_images=64, glove_dim=100):
    """Every data set of the companion under ``root``, as downloaded; returns the checksums JSON path.

    MNIST and Fashion-MNIST: ``<root>/{MNIST,FashionMNIST}/raw/*-ubyte.gz`` (``n_images`` train, half as
    many test); CIFAR-10: ``<root>/cifar-10-python.tar.gz`` (5 x 8 train, 16 test images); IMDb:
    ``<root>/aclImdb_v1.tar.gz`` (8 reviews per split and label); GloVe: ``<root>/glove/glove.6B.zip``
    with ``glove.6B.<glove_dim>d.txt``; CelebA: ``<root>/celeba/`` (8 train, 2 validation, 6 test
    faces). The returned JSON maps each md5-checked file name to the md5 of the file written here.
    """
    root = Path(root)
    make_idx_files(root / "MNIST" / "raw", n_train=n_images, n_test=n_images // 2, seed=0)
    make_idx_files(root / "FashionMNIST" / "raw", n_train=n_images, n_test=n_images // 2, seed=1)
    sums = {}

    packing = root / "packing"
    folder, _ = make_cifar_tree(packing, n=8)
    sums.update({p.name: md5(p) for p in folder.iterdir()})
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")

    words = ["the", "a", "movie", "film", ",", ".", "great", "awful", "is", "n't", "'s", "plot", "actor"]
    make_imdb_tree(packing, _reviews(8, words[:6] + words[8:], seed=2))
    with tarfile.open(root / "aclImdb_v1.tar.gz", "w:gz") as tar:
        tar.add(packing / "aclImdb", arcname="aclImdb")

    txt = packing / f"glove.6B.{glove_dim}d.txt"
    write_glove_txt(txt, words, torch.randn(len(words), glove_dim, generator=torch.Generator().manual_seed(3)))
    (root / "glove").mkdir()
    with zipfile.ZipFile(root / "glove" / "glove.6B.zip", "w") as zf:
        zf.write(txt, txt.name)

    celeba, _ = make_celeba_tree(root, partitions=(0,) * 8 + (1,) * 2 + (2,) * 6)
    sums.update({p.name: md5(p) for p in celeba.glob("*.txt")})
    sums.update({name: md5(root / rel) for name, rel in (("cifar-10-python.tar.gz", "cifar-10-python.tar.gz"),
                                                          ("aclImdb_v1.tar.gz", "aclImdb_v1.tar.gz"),
                                                          ("glove.6B.zip", "glove/glove.6B.zip"))})
    for path in sorted(packing.rglob("*"), reverse=True):  # only the downloads stay
        path.unlink() if path.is_file() else path.rmdir()
    packing.rmdir()
    checksums = root / "checksums.json"
    checksums.write_text(json.dumps(sums, indent=1))
    return checksums
