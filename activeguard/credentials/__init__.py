"""User credentials: fingerprinting-output spaces, C&W fingerprints, the control layer's
decision, signed licenses and gateway sessions. Above models; below the guard.
"""
