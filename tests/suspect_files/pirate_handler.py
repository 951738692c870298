"""A pirate's TorchServe handler: a stolen TorchScript model behind an API of its own, not ActiveGuard's.

``{"instances": [row, ...]}`` in (HTTP body, or the gRPC input map's ``data``), ``{"predictions":
[{"label": k, "probs": [...]}, ...]}`` out. It imports nothing from ActiveGuard: the audit must reach
it as any outsider's API, through ``--request-template`` and ``--response-path``.
"""

import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class PirateHandler(BaseHandler):
    """BaseHandler loads the archive's TorchScript file; this only speaks the pirate's JSON."""

    def handle(self, data, context):
        return [json.dumps({"predictions": self.predict(self.instances(request))}) for request in data]

    @staticmethod
    def instances(request):
        body = request.get("data") if request.get("data") is not None else request.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        return torch.tensor(body["instances"], dtype=torch.float32)

    def predict(self, x):
        with torch.inference_mode():
            probs = torch.softmax(self.model(x.to(self.device)), 1).cpu()
        return [{"label": int(p.argmax()), "probs": p.tolist()} for p in probs]
