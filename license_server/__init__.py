"""ActiveGuard's gRPC license server: allocation, fingerprint generation, signing, store, revocation.

Imports the core library ``activeguard``; the core never imports this package.
"""
