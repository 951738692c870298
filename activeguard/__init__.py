"""ActiveGuard: active IP protection for served PyTorch models."""

__version__ = "0.1.0"
