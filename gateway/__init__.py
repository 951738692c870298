"""The ActiveGuard gRPC gateway: sessions from licenses, inference forwarded to TorchServe."""
