"""The serving-side guard: a batch of requests in, a decision per request out, as a short
sequence of collaborators (parsing, credential check, one forward pass, policy). Framework-free:
the TorchServe handler is thin glue around it.
"""
