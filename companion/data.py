"""Dataset access for the LOSSGRAD companion notebooks.

Every notebook gets its data through :func:`load`, which picks by *profile*:

* ``"smoke"``: a small synthetic stand-in (no files, no network) with the same
  shapes and dtypes as the real data and a learnable structure, so a smoke run
  shows a falling loss in seconds;
* ``"quick"`` / ``"paper"``: the real data set, read from the data folder and
  downloaded there when missing. When it is missing and cannot be downloaded,
  :class:`DatasetUnavailable` says which files to put where. Synthetic data is
  never substituted silently.

The data folder is ``root=`` when given, else ``$LOSSGRAD_DATA``, else
``<repo>/data`` (:data:`DATA_DIR`). Layout under it (what torchvision expects)::

    MNIST/raw/                  train-images-idx3-ubyte(.gz) ... (4 IDX files)
    FashionMNIST/raw/           the same 4 IDX file names
    cifar-10-batches-py/        data_batch_1..5, test_batch, batches.meta
    celeba/                     img_align_celeba/*.jpg + 5 annotation .txt files
    aclImdb/{train,test}/{pos,neg}/*.txt
    glove/                      glove.6B.zip or glove.6B.<dim>d.txt

Checksums: the loaders check the md5 of the files they read against the published ones (CIFAR-10
and CelebA through torchvision; the IMDb and GloVe archives here). :data:`CHECKSUMS_ENV` names a
seam for running the same loaders, checks included, on files you made yourself (the tests'
original-format fixtures): see :func:`expected_md5`.

Tensors are returned in memory (the training loop batches by index
permutation); images as float32 in [0, 1] (MNIST, Fashion-MNIST) or uint8
(CIFAR-10, CelebA: 4x smaller, converted per batch).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.datasets import utils as tv_utils

from .profiles import PROFILES

__all__ = [
    "DATA_DIR", "DATASETS", "CHECKSUMS_ENV", "expected_md5", "checksum_substitutes", "PROFILES", "PAD_INDEX", "UNK_INDEX", "DatasetUnavailable",
    "mnist", "fashion_mnist", "cifar10", "cifar10_normalize", "augment_crop_flip", "celeba",
    "imdb", "tokenize", "glove", "glove_vocab", "imdb_tensors",
    "synthetic_mnist", "synthetic_fashion_mnist", "synthetic_cifar10", "synthetic_celeba",
    "synthetic_imdb", "load", "take",
]

DATA_DIR = Path(os.environ.get("LOSSGRAD_DATA") or Path(__file__).resolve().parent.parent / "data")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "celeba", "imdb")

# Where an installed copy of Fashion-MNIST may already lie (Debian package
# dataset-fashion-mnist); searched after <root>/FashionMNIST/raw.
FASHION_MNIST_SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, over all CIFAR-10 train pixels
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CELEBA_PAGE = "http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_CROP = 140  # centre crop of the WAE paper (Tolstikhin et al. 2018) before resizing to 64x64

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
IMDB_ARCHIVE = "aclImdb_v1.tar.gz"

GLOVE_URLS = (
    "https://nlp.stanford.edu/data/glove.6B.zip",
    "https://downloads.cs.stanford.edu/nlp/data/glove.6B.zip",
)
GLOVE_MD5 = "056ea991adb4740ac6bf1b6d9b50408b"
GLOVE_ARCHIVE = "glove.6B.zip"
GLOVE_DIMS = (50, 100, 200, 300)

PAD_INDEX = 0  # token id of padding; its embedding row is zero
UNK_INDEX = 1  # token id of every word missing from the vocabulary
_FIRST_WORD_INDEX = 2  # words[i] has token id i + 2


class DatasetUnavailable(RuntimeError):
    """A real data set is missing and could not be downloaded.

    The message names the data set, where to download it and the exact folder
    and file names to put there. Attributes: ``dataset``, ``urls``, ``path``.
    """

    def __init__(self, message: str, dataset: str = "", urls: Sequence[str] = (), path: Path | None = None):
        super().__init__(message)
        self.dataset = dataset
        self.urls = tuple(urls)
        self.path = path


# ----------------------------------------------------------------------------- checksums

# Names a JSON file {file name: md5} whose md5s replace the published ones of those files. Unset
# (what users have) means the published md5s. For testing the real loaders on hand-made files:
# every check still runs, against the md5s of the files the test wrote.
CHECKSUMS_ENV = "LOSSGRAD_CHECKSUMS"


def _published_md5s() -> dict:
    """Every data file whose md5 a loader checks, by the name the loaders know it by."""
    cifar, celeba = torchvision.datasets.CIFAR10, torchvision.datasets.CelebA
    table = {cifar.filename: cifar.tgz_md5, cifar.meta["filename"]: cifar.meta["md5"]}
    table.update({name: md5 for name, md5 in cifar.train_list + cifar.test_list})
    table.update({name: md5 for _, md5, name in celeba.file_list})
    table.update({IMDB_ARCHIVE: IMDB_MD5, GLOVE_ARCHIVE: GLOVE_MD5})
    return table


def checksum_substitutes() -> dict:
    """The md5s that ``$LOSSGRAD_CHECKSUMS`` substitutes for published ones (``{}`` when it is unset).

    A name that no loader checks is an error (a typo would otherwise leave the published md5 in
    force and the test failing for an unclear reason)."""
    path = os.environ.get(CHECKSUMS_ENV)
    if not path:
        return {}
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"${CHECKSUMS_ENV} names {path}, which is not a readable JSON file of "
                         f"{{file name: md5}} ({err}); unset it to use the published md5s") from err
    unknown = sorted(set(table) - set(_published_md5s()))
    if unknown:
        raise ValueError(f"${CHECKSUMS_ENV} ({path}) names files no loader checks: {unknown}; "
                         f"known names: {sorted(_published_md5s())}")
    return table


def expected_md5(name: str) -> str:
    """The md5 a loader requires of the data file ``name``: the published one, unless
    ``$LOSSGRAD_CHECKSUMS`` substitutes another (then with a warning, since such data are not the
    published data set)."""
    published = _published_md5s()[name]
    substitute = checksum_substitutes().get(name)
    if substitute is None:
        return published
    if name not in _WARNED_SUBSTITUTES:  # once per file and process
        _WARNED_SUBSTITUTES.add(name)
        warnings.warn(f"{name}: checking against md5 {substitute} from ${CHECKSUMS_ENV}, not the published "
                      f"{published}: these are not the published data", stacklevel=2)
    return substitute


_WARNED_SUBSTITUTES: set = set()


def _md5_failures(folder: Path, names) -> str:
    """``" (<file> fails its md5 check, ...)"`` for the files among ``names`` present in ``folder`` whose
    md5 is not :func:`expected_md5`'s, else ``""``: tells a damaged file from a missing one."""
    bad = [str(folder / n) for n in names if (folder / n).is_file()
           and not tv_utils.check_integrity(str(folder / n), expected_md5(n))]
    return f" ({', '.join(bad)} fail{'s' if len(bad) == 1 else ''} its md5 check: damaged or not the " \
           "original; delete and download again)" if bad else ""


def _checked_dataset_class(cls):
    """``cls`` (torchvision's CIFAR10 or CelebA), or a subclass whose md5 tables hold :func:`expected_md5`'s
    values where ``$LOSSGRAD_CHECKSUMS`` substitutes some; torchvision's own checks then run unchanged."""
    if not checksum_substitutes():
        return cls
    if cls is torchvision.datasets.CIFAR10:
        attrs = dict(tgz_md5=expected_md5(cls.filename),
                     train_list=[[name, expected_md5(name)] for name, _ in cls.train_list],
                     test_list=[[name, expected_md5(name)] for name, _ in cls.test_list],
                     meta=dict(cls.meta, md5=expected_md5(cls.meta["filename"])))
    elif cls is torchvision.datasets.CelebA:
        attrs = dict(file_list=[(fid, expected_md5(name), name) for fid, _, name in cls.file_list])
    else:
        raise TypeError(f"no md5 tables known for {cls.__name__}")
    return type(cls.__name__, (cls,), attrs)


# ----------------------------------------------------------------------------- helpers

def _resolve_root(root) -> Path:
    """``root`` if given, else ``$LOSSGRAD_DATA`` (read now), else :data:`DATA_DIR`."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("LOSSGRAD_DATA") or DATA_DIR).expanduser()


def _unavailable(dataset: str, reason: str, urls: Sequence[str], folder: Path,
                 files: Sequence[str], note: str = "") -> DatasetUnavailable:
    lines = [f"{dataset} is not available: {reason}",
             "Download it from: " + "  or  ".join(urls),
             f"and put these files in {folder}:"]
    lines += [f"    {name}" for name in files]
    if note:
        lines.append(note)
    lines.append("The data folder is root=..., else $LOSSGRAD_DATA, else "
                 f"{DATA_DIR}. With internet access, download=True fetches the files itself.")
    return DatasetUnavailable("\n".join(lines), dataset=dataset, urls=urls, path=folder)


def atomic_save(obj, path: Path) -> None:
    """Write a cache file so that an interrupted run never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- MNIST, Fashion-MNIST

def _unpack_local_idx(raw: Path, gz_names: Sequence[str], search: Sequence[Path]) -> None:
    """Put the decompressed IDX files torchvision reads into ``raw``.

    For each missing ``raw/<name>`` (no ``.gz``) look for ``<name>.gz`` or
    ``<name>`` in ``search`` (in order) and decompress / copy it. Local copies
    are not md5-checked: redistributed copies (e.g. Debian's) are recompressed,
    so their ``.gz`` checksums differ from the originals; torchvision's reader
    still checks the IDX headers.
    """
    for gz_name in gz_names:
        name = gz_name[: -len(".gz")]
        target = raw / name
        if target.is_file():
            continue
        for folder in search:
            if (folder / gz_name).is_file():
                raw.mkdir(parents=True, exist_ok=True)
                tmp = tempfile.mkdtemp(dir=raw)
                try:
                    out = tv_utils.extract_archive(str(folder / gz_name), tmp)
                    os.replace(out, target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                break
            if (folder / name).is_file() and folder != raw:
                raw.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, target)
                break


def _idx_dataset(cls, label: str, root, download: bool, extra_dirs: Sequence[Path] = (),
                 note: str = "") -> dict:
    root = _resolve_root(root)
    raw = root / cls.__name__ / "raw"
    gz_names = [name for name, _ in cls.resources]
    _unpack_local_idx(raw, gz_names, [raw, *extra_dirs])
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except (OSError, RuntimeError) as err:
        reason = (f"download failed ({err})".replace("\n", " ") if download
                  else "files not found and download=False")
        raise _unavailable(label, reason, [m + gz_names[0] for m in cls.mirrors], raw,
                           gz_names, note or "(gzipped as downloaded, or already decompressed)") from err
    return {"train": _idx_tensors(train), "test": _idx_tensors(test)}


def _idx_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    x = ds.data.unsqueeze(1).to(torch.float32).div_(255.0)
    return x, ds.targets.to(torch.int64)


def mnist(root=None, download: bool = True) -> dict:
    """MNIST via ``torchvision.datasets.MNIST``.

    Returns ``{"train": (x, y), "test": (x, y)}`` with x float32 (N, 1, 28, 28)
    in [0, 1] and y int64 (60000 train, 10000 test images). The four IDX files
    may be put in ``<root>/MNIST/raw/`` gzipped or decompressed.
    """
    return _idx_dataset(torchvision.datasets.MNIST, "MNIST", root, download)


def fashion_mnist(root=None, download: bool = True) -> dict:
    """Fashion-MNIST, same format as :func:`mnist`.

    Before downloading, the four original ``.gz`` IDX files are looked for in
    ``<root>/FashionMNIST/raw/`` and then in :data:`FASHION_MNIST_SYSTEM_DIRS`
    (``/usr/share/datasets/fashion-mnist/`` of the Debian package
    ``dataset-fashion-mnist``); found ones are decompressed into torchvision's
    raw folder so that no download is needed.
    """
    note = ("(gzipped or decompressed; the Debian package dataset-fashion-mnist installs them in "
            + ", ".join(str(d) for d in FASHION_MNIST_SYSTEM_DIRS) + ", which is searched too)")
    return _idx_dataset(torchvision.datasets.FashionMNIST, "Fashion-MNIST", root, download,
                        extra_dirs=tuple(Path(d) for d in FASHION_MNIST_SYSTEM_DIRS), note=note)


# ----------------------------------------------------------------------------- CIFAR-10

def cifar10(root=None, download: bool = True) -> dict:
    """CIFAR-10 via ``torchvision.datasets.CIFAR10`` (the python batches).

    Returns ``{"train": (x, y), "test": (x, y)}``, x uint8 (N, 3, 32, 32),
    y int64; 50000 / 10000 images. torchvision checks the md5 of every batch
    file, so only the original files load. Convert batches with
    :func:`cifar10_normalize`.
    """
    cls = _checked_dataset_class(torchvision.datasets.CIFAR10)
    root = _resolve_root(root)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except (OSError, RuntimeError) as err:
        reason = (f"download failed ({err})" if download
                  else "files not found, or they failed torchvision's md5 check, and download=False")
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        reason += _md5_failures(root, [cls.filename]) + _md5_failures(root / cls.base_folder, files)
        raise _unavailable("CIFAR-10", reason, [cls.url], root / cls.base_folder, files,
                           f"(unpack {cls.filename}, md5 {cls.tgz_md5}, in {root})") from err
    return {"train": _cifar_tensors(train), "test": _cifar_tensors(test)}


def _cifar_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps HWC
    return x, torch.as_tensor(ds.targets, dtype=torch.int64)


def cifar10_normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32, standardised per channel.

    Uses the mean and standard deviation of all CIFAR-10 training pixels
    (:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`, on the [0, 1] scale).
    Refuses non-uint8 input so that data are never normalised twice.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"cifar10_normalize expects uint8 images, got {x.dtype}; "
                        "pass the raw images from cifar10()/synthetic_cifar10()")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected images shaped (..., 3, H, W), got {tuple(x.shape)}")
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(3, 1, 1)
    return (x.to(torch.float32) / 255.0 - mean) / std


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding + random horizontal flip, batch-wise.

    Same distribution as torchvision's ``RandomCrop(size, padding)`` followed by
    ``RandomHorizontalFlip(0.5)``, applied independently to every image of
    ``x`` (N, C, H, W), any dtype, any device: pad by ``padding`` zeros on each
    side, cut an H x W window at a uniform offset in [0, 2*padding]^2, mirror it
    with probability 1/2. One gather for the whole batch, no loop over images.
    The random draws come from ``generator`` only, so a seeded generator
    reproduces the batch exactly.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_crop_flip expects a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = x.shape
    dev = generator.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev).to(x.device)
    flip = (torch.rand(n, generator=generator, device=dev) < 0.5).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # mirrored window = flipped crop
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- CelebA

def _first_of_batch(batch):
    return torch.stack([img for img, _ in batch])


def _images_to_tensor(ds, size: int) -> torch.Tensor:
    """Decode a torchvision image dataset (transform -> uint8 CHW) into one tensor."""
    big = len(ds) > 2000
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False, collate_fn=_first_of_batch,
                                         num_workers=min(4, os.cpu_count() or 1) if big else 0)
    out = torch.empty(len(ds), 3, size, size, dtype=torch.uint8)
    i = 0
    for imgs in loader:
        out[i:i + len(imgs)] = imgs
        i += len(imgs)
    return out


def celeba(root=None, size: int = 64, download: bool = True, crop: int = CELEBA_CROP) -> dict:
    """CelebA aligned faces as uint8 tensors, labels discarded.

    Each 178x218 ``img_align_celeba`` image is centre-cropped to ``crop`` x
    ``crop`` pixels (140, as in the WAE paper) and resized to ``size`` x ``size``
    (64, antialiased). Splits follow ``list_eval_partition.txt``: ``train`` =
    partition 0 (162770 images), ``test`` = partition 2 (19962); the
    validation partition is not used. Returns ``{"train": x, "test": x}``,
    x uint8 (N, 3, size, size).

    Read with ``torchvision.datasets.CelebA``, which requires in
    ``<root>/celeba/``: the folder ``img_align_celeba/`` of jpgs and the five
    text files below with their md5 (torchvision checks those md5s and only
    the existence of the image folder). The preprocessed tensors are cached in
    ``<root>/celeba/celeba_crop<crop>_<size>.pt``; delete it to rebuild.
    """
    cls = _checked_dataset_class(torchvision.datasets.CelebA)
    root = _resolve_root(root)
    folder = root / cls.base_folder
    cache = folder / f"celeba_crop{crop}_{size}.pt"
    if cache.is_file():
        cached = torch.load(cache, weights_only=True)
        return {"train": cached["train"], "test": cached["test"]}
    tf = torchvision.transforms.Compose([
        torchvision.transforms.CenterCrop(crop),
        torchvision.transforms.Resize((size, size), antialias=True),
        torchvision.transforms.PILToTensor(),
    ])
    try:
        train = cls(str(root), split="train", target_type=[], transform=tf, download=download)
        test = cls(str(root), split="test", target_type=[], transform=tf, download=False)
    except (OSError, RuntimeError) as err:
        reason = (f"download failed ({err})" if download
                  else "files not found, or they failed torchvision's md5 check, and download=False")
        reason += _md5_failures(folder, [name for _, _, name in cls.file_list if not name.endswith(".zip")])
        files = ["img_align_celeba/   (folder of 202599 jpgs: unzip img_align_celeba.zip here)"]
        files += [f"{name}   (md5 {md5}; https://drive.google.com/uc?id={fid})"
                  for fid, md5, name in cls.file_list if not name.endswith(".zip")]
        zip_id = next(fid for fid, _, name in cls.file_list if name == "img_align_celeba.zip")
        note = (f"img_align_celeba.zip: https://drive.google.com/uc?id={zip_id}. torchvision's Google-Drive "
                "download often fails (quota; it also needs the gdown package): fetch the files by hand.")
        raise _unavailable("CelebA", reason, [CELEBA_PAGE], folder, files, note) from err
    print(f"Preprocessing CelebA once ({len(train) + len(test)} images) -> {cache}", flush=True)
    out = {"train": _images_to_tensor(train, size), "test": _images_to_tensor(test, size)}
    atomic_save(out, cache)
    return out


# ----------------------------------------------------------------------------- IMDb and GloVe

def _imdb_present(base: Path) -> bool:
    return all((base / split / kind).is_dir() for split in ("train", "test") for kind in ("pos", "neg"))


def imdb(root=None, download: bool = True) -> dict:
    """The IMDb review data set (Maas et al. 2011, aclImdb v1), without torchtext.

    Returns ``{"train": [(text, label), ...], "test": [...]}`` (25000 each),
    label 1 = positive, 0 = negative; negatives first, files in name order.
    Reads ``<root>/aclImdb/{train,test}/{pos,neg}/*.txt``; the ``unsup`` folder
    is ignored. When the tree is missing, ``<root>/aclImdb_v1.tar.gz`` is
    extracted (downloaded first if absent; md5-checked) with torchvision's
    ``download_and_extract_archive``.
    """
    root = _resolve_root(root)
    base = root / "aclImdb"
    if not _imdb_present(base):
        archive = root / IMDB_ARCHIVE
        md5 = expected_md5(IMDB_ARCHIVE)
        files = [IMDB_ARCHIVE + f"   (md5 {md5}), or the extracted tree aclImdb/{{train,test}}/{{pos,neg}}/*.txt"]
        have_archive = tv_utils.check_integrity(str(archive), md5)
        if not (have_archive or download):
            reason = (f"{archive} fails its md5 check (damaged or incomplete; delete it and download it again)"
                      if archive.is_file() else "files not found")
            raise _unavailable("IMDb", reason + " and download=False", [IMDB_URL], root, files)
        try:  # uses the archive when its md5 matches, else downloads it
            tv_utils.download_and_extract_archive(IMDB_URL, str(root), filename=IMDB_ARCHIVE, md5=md5)
        except (OSError, RuntimeError, tarfile.TarError) as err:
            raise _unavailable("IMDb", f"download failed ({err})" + _md5_failures(root, [IMDB_ARCHIVE]),
                               [IMDB_URL], root, files) from err
        if not _imdb_present(base):
            raise _unavailable("IMDb", f"{archive} did not contain aclImdb/{{train,test}}/{{pos,neg}}/",
                               [IMDB_URL], root, [IMDB_ARCHIVE])
    return {split: _read_reviews(base / split) for split in ("train", "test")}


def _read_reviews(folder: Path) -> list[tuple[str, int]]:
    out = []
    for label, kind in ((0, "neg"), (1, "pos")):
        for path in sorted((folder / kind).glob("*.txt")):
            out.append((path.read_text(encoding="utf-8"), label))
    return out


# A word (letters/digits, Unicode-aware) stopping before "n't"; "n't"; the
# clitics 's 're 've 'll 'd 'm; a word; any other single non-space character.
_TOKEN_RE = re.compile(r"[^\W_]+(?=n't)|n't|'(?:s|re|ve|ll|d|m)(?![^\W_])|[^\W_]+|[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Split a review into lowercase word and punctuation tokens.

    Steps: lowercase; replace the HTML line breaks ``<br />`` of the IMDb
    files by spaces; then take, left to right, the longest of: a run of
    letters/digits, the clitics ``n't 's 're 've 'll 'd 'm`` split off the
    word before them (as GloVe's tokenizer does, so they are found in its
    vocabulary), or any single other non-space character (punctuation).
    Example: ``"It's <br />NOT bad, isn't it?!"`` ->
    ``['it', "'s", 'not', 'bad', ',', 'is', "n't", 'it', '?', '!']``.
    """
    text = text.lower().replace("<br />", " ")
    return _TOKEN_RE.findall(text)


def _parse_glove(lines, dim: int, source: str) -> tuple[list[str], torch.Tensor]:
    words, rows = [], []
    for number, line in enumerate(lines, 1):
        parts = line.rstrip("\r\n").rstrip(" ").split(" ")
        if parts == [""]:
            continue
        if len(parts) < dim + 1:
            raise ValueError(f"{source}, line {number}: expected a word and {dim} numbers, "
                             f"got {len(parts)} fields; is this the {dim}-d file?")
        words.append(" ".join(parts[:-dim]))
        rows.append(np.asarray(parts[-dim:], dtype=np.float32))
    if not rows:
        raise ValueError(f"{source} holds no vectors")
    return words, torch.from_numpy(np.stack(rows))


def glove(dim: int = 100, root=None, download: bool = True) -> tuple[list[str], torch.Tensor]:
    """GloVe 6B word vectors (Pennington et al. 2014): ``(words, vectors (V, dim))``.

    Reads ``<root>/glove/glove.6B.<dim>d.txt``, or that member of
    ``<root>/glove/glove.6B.zip`` (md5-checked; downloaded when neither is
    there). The parsed matrix is cached in ``<root>/glove/glove.6B.<dim>d.pt``
    and later calls read only the cache (delete it after changing the text).
    """
    if dim not in GLOVE_DIMS:
        raise ValueError(f"GloVe 6B comes in dims {GLOVE_DIMS}, got dim={dim}")
    folder = _resolve_root(root) / "glove"
    name = f"glove.6B.{dim}d.txt"
    txt, archive, cache = folder / name, folder / GLOVE_ARCHIVE, folder / f"glove.6B.{dim}d.pt"
    if cache.is_file():
        cached = torch.load(cache, weights_only=True)
        return cached["words"], cached["vectors"]
    md5 = expected_md5(GLOVE_ARCHIVE)
    files = [f"{name}, or {GLOVE_ARCHIVE} (md5 {md5}) which contains it"]
    if txt.is_file():
        with open(txt, encoding="utf-8") as fh:
            words, vectors = _parse_glove(fh, dim, str(txt))
    else:
        if archive.is_file() and not tv_utils.check_integrity(str(archive), md5):
            raise _unavailable("GloVe 6B", f"{archive} fails its md5 check (damaged or incomplete: delete it and "
                               "download it again)", GLOVE_URLS, folder, files)
        if not archive.is_file():
            if not download:
                raise _unavailable("GloVe 6B", "files not found and download=False", GLOVE_URLS, folder, files)
            errors = []
            for url in GLOVE_URLS:
                try:
                    tv_utils.download_url(url, str(folder), filename=archive.name, md5=md5)
                    break
                except (OSError, RuntimeError) as err:
                    errors.append(f"{url}: {err}")
            else:
                raise _unavailable("GloVe 6B", "download failed (" + "; ".join(errors) + ")",
                                   GLOVE_URLS, folder, files)
        try:
            with zipfile.ZipFile(archive) as zf, zf.open(name) as member:
                words, vectors = _parse_glove(io.TextIOWrapper(member, encoding="utf-8"), dim,
                                              f"{archive}:{name}")
        except (zipfile.BadZipFile, KeyError) as err:
            raise _unavailable("GloVe 6B", f"{archive} is damaged or lacks {name} ({err})",
                               GLOVE_URLS, folder, files) from err
    atomic_save({"words": words, "vectors": vectors}, cache)
    return words, vectors


def glove_vocab(words: Sequence[str], vectors: torch.Tensor) -> torch.Tensor:
    """Embedding matrix (len(words) + 2, dim) for token ids made by :func:`imdb_tensors`.

    Row 0 (:data:`PAD_INDEX`) is zero: padding. Row 1 (:data:`UNK_INDEX`) is
    the mean of all vectors: the embeddings stay frozen in the paper's model,
    so an unknown word should read as an average word, not as nothing (a zero
    vector would make it identical to padding). Row i + 2 is ``vectors[i]``.
    """
    if vectors.dim() != 2 or vectors.shape[0] != len(words):
        raise ValueError(f"need one vector per word: {len(words)} words, vectors of shape {tuple(vectors.shape)}")
    vectors = vectors.to(torch.float32)
    special = torch.stack([torch.zeros(vectors.shape[1]), vectors.mean(0)])
    return torch.cat([special, vectors])


def imdb_tensors(split_data: Sequence[tuple[str, int]], words: Sequence[str] | Mapping[str, int],
                 max_len: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reviews -> ``(tokens int64 (N, max_len), lengths int64 (N,), labels float32 (N,))``.

    Each text is :func:`tokenize`-d; a token becomes its id in ``words``
    (``words[i]`` -> i + 2, matching :func:`glove_vocab`; a ready mapping word
    -> id may be passed instead), or :data:`UNK_INDEX` when absent. The first
    ``max_len`` tokens are kept (the start of a review), the rest of the row is
    :data:`PAD_INDEX`. A review without tokens becomes one unknown token, so
    every length is >= 1 (packed RNN sequences need that).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    index = words if isinstance(words, Mapping) else {w: i + _FIRST_WORD_INDEX for i, w in enumerate(words)}
    n = len(split_data)
    tokens = np.full((n, max_len), PAD_INDEX, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    labels = np.empty(n, dtype=np.float32)
    for row, (text, label) in enumerate(split_data):
        ids = [index.get(t, UNK_INDEX) for t in tokenize(text)[:max_len]] or [UNK_INDEX]
        tokens[row, :len(ids)] = ids
        lengths[row] = len(ids)
        labels[row] = label
    return torch.from_numpy(tokens), torch.from_numpy(lengths), torch.from_numpy(labels)


# ----------------------------------------------------------------------------- synthetic stand-ins

def _prototypes(g: torch.Generator, classes: int, channels: int, size: int, low: int) -> torch.Tensor:
    """Smooth random class patterns in [0, 1]: low-res uniform noise, upsampled."""
    coarse = torch.rand(classes, channels, low, low, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _prototype_split(g, protos, n: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, protos.shape[0], (n,), generator=g)
    x = protos[y] + noise * torch.randn((n,) + tuple(protos.shape[1:]), generator=g)
    return x.clamp_(0.0, 1.0), y


def _check_sizes(n_train: int, n_test: int) -> None:
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")


def synthetic_mnist(n_train: int = 512, n_test: int = 256, seed: int = 0, noise: float = 0.3) -> dict:
    """MNIST-shaped stand-in: 10 smooth class prototypes + Gaussian pixel noise.

    Same contract as :func:`mnist` (x float32 (N, 1, 28, 28) in [0, 1],
    y int64 in 0..9); deterministic given ``seed``; a linear classifier
    learns it well above chance.
    """
    _check_sizes(n_train, n_test)
    g = torch.Generator().manual_seed(seed)
    protos = _prototypes(g, 10, 1, 28, 7)
    return {"train": _prototype_split(g, protos, n_train, noise),
            "test": _prototype_split(g, protos, n_test, noise)}


def synthetic_fashion_mnist(n_train: int = 512, n_test: int = 256, seed: int = 0, noise: float = 0.2) -> dict:
    """Fashion-MNIST-shaped stand-in (contract of :func:`fashion_mnist`).

    Coarser prototypes (4x4 upsampled) than :func:`synthetic_mnist`, so the
    images are smooth and compress well for the autoencoder.
    """
    _check_sizes(n_train, n_test)
    g = torch.Generator().manual_seed(seed + 10_007)  # a stream distinct from synthetic_mnist
    protos = _prototypes(g, 10, 1, 28, 4)
    return {"train": _prototype_split(g, protos, n_train, noise),
            "test": _prototype_split(g, protos, n_test, noise)}


def synthetic_cifar10(n_train: int = 512, n_test: int = 256, seed: int = 0, noise: float = 0.25) -> dict:
    """CIFAR-10-shaped stand-in: x uint8 (N, 3, 32, 32), y int64 in 0..9.

    Colour class prototypes (8x8 upsampled) + Gaussian noise, quantised to uint8.
    """
    _check_sizes(n_train, n_test)
    g = torch.Generator().manual_seed(seed + 20_011)
    protos = _prototypes(g, 10, 3, 32, 8)

    def split(n):
        x, y = _prototype_split(g, protos, n, noise)
        return x.mul_(255).round_().to(torch.uint8), y

    return {"train": split(n_train), "test": split(n_test)}


def synthetic_celeba(n_train: int = 256, n_test: int = 128, size: int = 64, latent_dim: int = 8,
                     seed: int = 0) -> dict:
    """CelebA-shaped stand-in: x uint8 (N, 3, size, size), no labels.

    Each image is sigmoid(A z + b) on an 8x8 colour grid, upsampled to
    ``size`` (bilinear): smooth images on a ``latent_dim``-dimensional
    manifold, which an autoencoder with that latent size can learn.
    """
    _check_sizes(n_train, n_test)
    g = torch.Generator().manual_seed(seed + 30_011)
    basis = 1.5 * torch.randn(latent_dim, 3 * 8 * 8, generator=g)
    bias = 0.5 * torch.randn(3 * 8 * 8, generator=g)

    def split(n):
        z = torch.randn(n, latent_dim, generator=g) / latent_dim ** 0.5
        coarse = torch.sigmoid(z @ basis + bias).view(n, 3, 8, 8)
        img = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)

    return {"train": split(n_train), "test": split(n_test)}


def synthetic_imdb(n_train: int = 512, n_test: int = 256, vocab_size: int = 200, dim: int = 100,
                   max_len: int = 64, seed: int = 0) -> dict:
    """IMDb-shaped stand-in with a small random "GloVe".

    Words ``w0..w{vocab_size-1}``; ``w0..w9`` are positive, ``w10..w19``
    negative, the rest neutral. Their vectors are random with a shared
    sentiment direction added (+ for positive, - for negative words), like
    real embeddings carry meaning. A review is 8..max_len neutral tokens into
    which 2-4 words of its own sentiment and fewer of the other are placed;
    label 1 = more positive words. Returns the contract of
    ``load("imdb", ...)``: ``{"train": (tokens, lengths, labels), "test": ...,
    "embeddings": (vocab_size + 2, dim), "words": [...]}``.
    """
    _check_sizes(n_train, n_test)
    if vocab_size < 30 or max_len < 8:
        raise ValueError(f"need vocab_size >= 30 and max_len >= 8, got {vocab_size} and {max_len}")
    g = torch.Generator().manual_seed(seed + 40_009)
    words = [f"w{i}" for i in range(vocab_size)]
    vectors = torch.randn(vocab_size, dim, generator=g) / dim ** 0.5
    direction = torch.randn(dim, generator=g)
    direction /= direction.norm()
    vectors[:10] += 1.5 * direction
    vectors[10:20] -= 1.5 * direction
    positive = torch.arange(10) + _FIRST_WORD_INDEX
    negative = torch.arange(10, 20) + _FIRST_WORD_INDEX

    def split(n):
        tokens = torch.full((n, max_len), PAD_INDEX, dtype=torch.int64)
        lengths = torch.randint(8, max_len + 1, (n,), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        for i in range(n):
            length = int(lengths[i])
            tokens[i, :length] = torch.randint(20, vocab_size, (length,), generator=g) + _FIRST_WORD_INDEX
            n_major = int(torch.randint(2, 5, (), generator=g))
            n_minor = int(torch.randint(0, n_major - 1, (), generator=g))
            major, minor = (positive, negative) if labels[i] == 1 else (negative, positive)
            where = torch.randperm(length, generator=g)[: n_major + n_minor]
            picks = torch.cat([major[torch.randint(0, 10, (n_major,), generator=g)],
                               minor[torch.randint(0, 10, (n_minor,), generator=g)]])
            tokens[i, where] = picks
        return tokens, lengths, labels.to(torch.float32)

    return {"train": split(n_train), "test": split(n_test),
            "embeddings": glove_vocab(words, vectors), "words": words}


# ----------------------------------------------------------------------------- entry point

_SYNTHETIC = {
    "mnist": synthetic_mnist, "fashion_mnist": synthetic_fashion_mnist, "cifar10": synthetic_cifar10,
    "celeba": synthetic_celeba, "imdb": synthetic_imdb,
}


def _load_imdb(root=None, max_len: int = 400, dim: int = 100, download: bool = True) -> dict:
    reviews = imdb(root, download=download)
    words, vectors = glove(dim, root, download=download)
    index = {w: i + _FIRST_WORD_INDEX for i, w in enumerate(words)}
    return {"train": imdb_tensors(reviews["train"], index, max_len),
            "test": imdb_tensors(reviews["test"], index, max_len),
            "embeddings": glove_vocab(words, vectors), "words": words}


_REAL = {"mnist": mnist, "fashion_mnist": fashion_mnist, "cifar10": cifar10, "celeba": celeba, "imdb": _load_imdb}


def load(name: str, profile: str, root=None, **kw) -> dict:
    """The data set ``name`` for a run profile.

    ``profile="smoke"``: the synthetic stand-in (``root`` unused; ``kw`` go to
    ``synthetic_<name>``, e.g. ``n_train``, ``seed``). ``"quick"``/``"paper"``:
    the real data (``kw`` go to the real loader, e.g. ``download``; for imdb
    also ``max_len`` and ``dim``), raising :class:`DatasetUnavailable` when
    missing. Returns ``{"train": ..., "test": ...}`` as the loader does; for
    imdb ``{"train": (tokens, lengths, labels), "test": ..., "embeddings": E,
    "words": [...]}`` (see :func:`imdb_tensors`, :func:`glove_vocab`).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    if profile == "smoke":
        return _SYNTHETIC[name](**kw)
    return _REAL[name](root=root, **kw)


def take(split: tuple, n: int | None) -> tuple:
    """The first ``n`` examples of a split (all of it for ``None``): the quick and smoke profiles' subsets."""
    if not isinstance(split, tuple):
        raise TypeError(f"take expects a split as a tuple of tensors, e.g. (images, labels); got {type(split).__name__}"
                        " (wrap a single tensor as (x,))")
    if n is None:
        return split
    if n < 1:
        raise ValueError(f"n must be None (everything) or a positive count, got {n!r}")
    return tuple(t[:n] for t in split)


def random_subset(split: tuple, n: int | None, seed: int = 0) -> tuple:
    """``n`` examples of a split drawn without replacement by a seeded permutation (all, in order, for ``None``).

    For subsets of splits stored in a meaningful order, where :func:`take` would be biased: the
    IMDb splits hold all negative reviews before the positive ones, so their first ``n`` are all
    negative. The same ``seed`` gives the same subset.
    """
    if n is None:
        return split
    total = len(split[0])
    if not 1 <= n <= total:
        raise ValueError(f"n must be None (everything) or a count in [1, {total}], got {n!r}")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return tuple(t[idx] for t in split)


def cifar10_normalized(profile: str, n_train: int | None = None, n_test: int | None = None,
                       root=None) -> tuple[tuple, tuple]:
    """CIFAR-10 as the CIFAR notebooks (01, 02, 05) feed it to their networks.

    Returns ``(train, test)``, each ``(x, y)`` with x float32 (N, 3, 32, 32) standardised by
    :func:`cifar10_normalize` and y int64: the first ``n_train`` / ``n_test`` images of each split
    (all of them for ``None``; :func:`take`), cut before converting so that a subset never
    holds the whole split in float32. ``profile`` as in :func:`load`: ``"smoke"`` gives the
    synthetic stand-in (512 / 256 images), ``"quick"`` / ``"paper"`` the real data.
    """
    data = load("cifar10", profile, root=root)
    return tuple((cifar10_normalize(x), y) for x, y in (take(data["train"], n_train), take(data["test"], n_test)))
