"""A plain TorchServe handler for the same model: the baseline ActiveGuard is measured against.

It parses the same JSON body and returns the same softmax JSON, with no credentials at all.
"""

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
        arrays = [np.asarray((b if isinstance(b, dict) else json.loads(b))["inputs"], dtype=np.float32) for b in bodies]
        sizes = [len(a) for a in arrays]
        with torch.no_grad():
            probs = torch.softmax(self.model(torch.from_numpy(np.concatenate(arrays))), dim=1)
        return [json.dumps({"outputs": p.tolist()}) for p in torch.split(probs, sizes)]
