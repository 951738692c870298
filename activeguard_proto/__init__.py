"""Generated protobuf / gRPC code for ActiveGuard's services: the one generated-code location.

Sources live in ``proto/activeguard/v1/*.proto`` (ours) and ``proto/torchserve/inference.proto``
(a copy of TorchServe 0.12's inference API, generated as ``activeguard_proto.torchserve``); regenerate with
``python -m activeguard_proto.codegen`` (``--check`` exits 1 when the committed code is stale).
Protobuf package ``activeguard.v1`` is generated here as ``activeguard_proto.v1`` so it never
shadows the core library ``activeguard``.
"""
