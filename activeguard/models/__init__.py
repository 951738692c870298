"""Models and data: every model source an owner may hold, the input spec, reference
architectures, the bundled offline datasets and the evaluation workloads. The bottom floor.
"""
