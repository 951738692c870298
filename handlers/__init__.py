"""TorchServe glue for ActiveGuard: the handler, `.mar` packaging and a managed TorchServe."""
