"""An owner's own TorchServe handler, as an image-classification service writes one: PNG bytes (or a
strict JSON body ``{"image": 28×28 floats}``) in, a label name and its confidence out. ActiveGuard
never sees this file except through `protect`."""

import io
import json
import os

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class FashionHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        with open(os.path.join(context.system_properties["model_dir"], "index_to_name.json")) as f:
            self.names = json.load(f)

    def preprocess(self, data):
        rows = []
        for row in data:
            payload = row.get("data") or row.get("body")
            if isinstance(payload, dict):  # TorchServe decoded an application/json body
                if set(payload) != {"image"}:
                    raise ValueError(f"unknown fields {sorted(set(payload) - {'image'})}")
                rows.append(torch.tensor(payload["image"], dtype=torch.float32)[None])
                continue
            image = Image.open(io.BytesIO(payload)).convert("L")
            rows.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None])
        return torch.stack(rows).to(self.device)

    def postprocess(self, data):
        confidence, index = torch.softmax(data, 1).max(1)
        return [
            {"label": self.names[str(int(i))], "confidence": round(float(c), 4)}
            for c, i in zip(confidence.tolist(), index.tolist())
        ]
