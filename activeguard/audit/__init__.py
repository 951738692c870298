"""Ownership audits: suspect models and the methods that judge them."""
