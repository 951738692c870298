"""Reference ReLU architectures, a seeded trainer, model identity and safe (de)serialization.

All networks are piecewise linear (ReLU, max-pool, linear heads) because TAFA's audit relies on
that structure. A checkpoint is a plain dict of strings, numbers and tensors, so it loads with
``torch.load(weights_only=True)`` and never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

CHECKPOINT_FORMAT = "activeguard-model/1"


class LeNet5(nn.Module):
    """LeNet-5 as in the paper: conv2 has shape (16, 6, 5, 5), i.e. 150 watermark positions."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, channels: tuple[int, int] = (6, 16)
    ):
        super().__init__()
        self.config = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
        if tuple(channels) != (6, 16):  # other widths: independent rivals in the audit's negative set
            self.config["channels"] = list(channels)
        c1, c2 = channels
        # 8x8 inputs (the Fashion-MNIST fallback) need padding to survive two 5x5 convs.
        pad2 = 2 if image_size < 16 else 0
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=pad2)
        side = ((image_size // 2) + 2 * pad2 - 4) // 2
        self.fc1 = nn.Linear(c2 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a skip connection (a 1x1 conv + BN where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 28x28 grayscale images: the realistic second workload (Fashion-MNIST).

    Stem (3x3 conv, BN, ReLU, 2x2 max-pool to 14x14), then one stage of residual blocks per width,
    every stage after the first halving the resolution, global average pooling and a linear head.
    The defaults (widths 16/32/64, two blocks per stage) give 15 conv layers (13 3x3, two 1x1
    shortcuts) and 175 k parameters: an epoch of the full Fashion-MNIST takes about 40 s on two CPU
    cores. Still piecewise linear in eval mode (BN is affine, pooling is max or mean), so every
    audit applies.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks: tuple[int, ...] = (2, 2, 2),
    ):
        super().__init__()
        widths, blocks = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
        if len(widths) != len(blocks) or not widths or min(widths + blocks) < 1:
            raise ValueError(f"widths and blocks must be positive and of equal length, got {widths} and {blocks}")
        self.config = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "image_size": image_size,
            "widths": list(widths),
            "blocks": list(blocks),
        }
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(2) if image_size >= 16 else nn.Identity(),
        )
        stages: list[nn.Module] = []
        channels = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            for b in range(count):
                stride = 2 if index > 0 and b == 0 else 1
                stages.append(ResidualBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _relu_stack(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPClassifier(nn.Module):
    """A fully-connected ReLU classifier: a second architecture for independent suspects."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        self.config = {"num_classes": num_classes, "in_features": in_features, "hidden": list(hidden)}
        self.net = _relu_stack([in_features, *hidden, num_classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.flatten(x, 1))


class MLPRegressor(nn.Module):
    """ReLU MLP with a linear scalar head (diabetes regression)."""

    def __init__(self, in_features: int = 10, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        self.config = {"in_features": in_features, "hidden": list(hidden)}
        self.net = _relu_stack([in_features, *hidden, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class FCGenerator(nn.Module):
    """ReLU fully-connected generator latent -> image, with a linear output (keeps it piecewise linear)."""

    def __init__(self, latent_dim: int = 16, out_features: int = 784, hidden: tuple[int, ...] = (128, 256)):
        super().__init__()
        self.config = {"latent_dim": latent_dim, "out_features": out_features, "hidden": list(hidden)}
        self.net = _relu_stack([latent_dim, *hidden, out_features])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "small-resnet": ResNet,
    "mlp-classifier": MLPClassifier,
    "mlp-regressor": MLPRegressor,
    "fc-generator": FCGenerator,
}


def arch_name(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered ActiveGuard architecture")


def input_shape(model: nn.Module) -> tuple[int, ...]:
    """The shape of one input row, read from the architecture's config."""
    cfg = model.config
    if "image_size" in cfg:
        return (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    return (cfg.get("in_features") or cfg["latent_dim"],)


def build_model(arch: str, **config: Any) -> nn.Module:
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}") from None
    for name in ("hidden", "widths", "blocks", "channels"):  # lists in a checkpoint's config, tuples in the constructor
        if name in config:
            config[name] = tuple(config[name])
    return cls(**config)


def model_id(model_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, names sorted: layout-independent."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        # Raw bytes in native (little-endian on every supported platform) order, any dtype.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_model(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> str:
    """Write a weights-only checkpoint and return the model id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": arch_name(model),
            "config": dict(model.config),
            "metadata": dict(metadata or {}),
            "state_dict": state,
        },
        path,
    )
    return model_id(state)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, foreign objects refused by weights_only
        raise ValueError(f"{path} is not a readable ActiveGuard checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an ActiveGuard checkpoint (expected format {CHECKPOINT_FORMAT})")
    return ckpt


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model from a checkpoint without unpickling arbitrary objects."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["arch"], **ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


Regularizer = Callable[[nn.Module], torch.Tensor]
SCHEDULES = ("constant", "onecycle")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "cross_entropy",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    optimizer: str = "adam",
    regularizer: Regularizer | None = None,
    schedule: str = "constant",
    progress: bool = False,
    desc: str = "training",
    stop_when: Callable[[nn.Module], bool] | None = None,
) -> nn.Module:
    """Seeded mini-batch training; ``regularizer`` adds a term (e.g. the watermark's Eq. 4).

    ``stop_when`` is asked after each epoch (the model in eval mode) and ends training early when true.

    ``schedule="onecycle"`` warms the learning rate up to ``lr`` and anneals it to ~0 over the run:
    a BatchNorm ResNet reaches its accuracy in a few epochs that way, which matters on a CPU.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    generator = seed_everything(seed)
    loss_fn = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}[loss]
    params = model.parameters()
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    model.train()
    steps = math.ceil(len(x) / batch_size)
    scheduler = None
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps))
    bar = tqdm(total=epochs * steps, desc=desc, disable=not progress, unit="batch", leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            opt.zero_grad()
            value = loss_fn(model(x[idx]), y[idx])
            if regularizer is not None:
                value = value + regularizer(model)
            value.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            bar.update()
        if stop_when is not None and stop_when(model.eval()):
            break
        model.train()
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def train_lenet5(split, *, epochs: int = 20, seed: int = 0, progress: bool = False) -> LeNet5:
    """The reference classifier used by the demo, tests and evaluations."""
    torch.manual_seed(seed)
    side = split.input_shape[-1]
    model = LeNet5(num_classes=split.num_classes, in_channels=split.input_shape[0], image_size=side)
    return train(model, split.x_train, split.y_train, epochs=epochs, seed=seed, progress=progress, desc="LeNet-5")


def train_regressor(split, *, epochs: int = 200, seed: int = 0, progress: bool = False) -> MLPRegressor:
    torch.manual_seed(seed)
    model = MLPRegressor(in_features=split.input_shape[0])
    return train(
        model,
        split.x_train,
        split.y_train,
        loss="mse",
        epochs=epochs,
        batch_size=32,
        seed=seed,
        progress=progress,
        desc="MLP regressor",
    )


def train_wgan_generator(
    images: torch.Tensor,
    *,
    latent_dim: int = 64,
    hidden: tuple[int, ...] = (128, 256, 512),
    iterations: int = 1000,
    critic_steps: int = 2,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> FCGenerator:
    """A WGAN generator (TAFA's generation scenario): a ReLU FCN latent → image against a critic
    image → 512 → 256 → 1, with the gradient penalty of WGAN-GP (λ = 10, Adam 1e-4, β = (0.5, 0.9)).
    ``critic_steps`` critic updates per generator update: 2 rather than WGAN-GP's 5, so that a
    generator trains in about 36 s on 2 CPU cores (1,000 iterations).  The output layer is linear,
    so the generator stays piecewise linear; images are the flattened rows of ``images``."""
    generator_rng = seed_everything(seed)
    flat = torch.flatten(images, 1)
    generator = FCGenerator(latent_dim=latent_dim, out_features=flat.shape[1], hidden=hidden)
    critic = nn.Sequential(
        nn.Linear(flat.shape[1], 512), nn.LeakyReLU(0.2), nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1)
    )
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_c = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def batch() -> torch.Tensor:
        return flat[torch.randint(len(flat), (batch_size,), generator=generator_rng)]

    for _ in tqdm(range(iterations), desc="WGAN generator", disable=not progress, leave=False):
        for _ in range(critic_steps):
            real = batch()
            fake = generator(torch.randn(batch_size, latent_dim, generator=generator_rng)).detach()
            mix = torch.rand(batch_size, 1, generator=generator_rng)
            between = (mix * real + (1 - mix) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
            penalty = ((grad.norm(dim=1) - 1) ** 2).mean()
            loss_c = critic(fake).mean() - critic(real).mean() + 10.0 * penalty
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
        loss_g = -critic(generator(torch.randn(batch_size, latent_dim, generator=generator_rng))).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    return generator.eval()


def train_generator(
    images: torch.Tensor, *, latent_dim: int = 16, epochs: int = 5, seed: int = 0, progress: bool = False
) -> FCGenerator:
    """Train the generator as the decoder of a ReLU autoencoder: a real, deterministic generative model."""
    torch.manual_seed(seed)
    flat = torch.flatten(images, 1)
    encoder = _relu_stack([flat.shape[1], 256, latent_dim])
    generator = FCGenerator(latent_dim=latent_dim, out_features=flat.shape[1])
    autoencoder = nn.Sequential(encoder, generator)
    train(
        autoencoder,
        flat,
        flat,
        loss="mse",
        epochs=epochs,
        batch_size=128,
        seed=seed,
        progress=progress,
        desc="generator",
    )
    return generator.eval()
