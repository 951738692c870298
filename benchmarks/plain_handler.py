"""A plain TorchServe handler for the same model: the baseline ActiveGuard is measured against.

It parses the same JSON body (or the same ``.npy`` bytes) and returns the same softmax JSON, with no
credentials at all.
"""

import io
import json
from pathlib import Path

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from activeguard.models.architectures import load_model


class PlainHandler(BaseHandler):
    def initialize(self, context):
        self.model = load_model(Path(context.system_properties["model_dir"]) / "model.pt")
        self.initialized = True

    def handle(self, data, context):
        bodies = [row.get("data") if row.get("data") is not None else row.get("body") for row in data]
        arrays = [_array(b) for b in bodies]
        sizes = [len(a) for a in arrays]
        with torch.no_grad():
            probs = torch.softmax(self.model(torch.from_numpy(np.concatenate(arrays))), dim=1)
        return [json.dumps({"outputs": p.tolist()}) for p in torch.split(probs, sizes)]


def _array(body) -> np.ndarray:
    """A request's rows: ``.npy`` bytes, or JSON ``{"inputs": [...]}`` (parsed by TorchServe or not)."""
    if isinstance(body, (bytes, bytearray)) and bytes(body[:6]) == b"\x93NUMPY":
        return np.load(io.BytesIO(body), allow_pickle=False).astype(np.float32, copy=False)
    return np.asarray((body if isinstance(body, dict) else json.loads(body))["inputs"], dtype=np.float32)
