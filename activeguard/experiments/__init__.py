"""Paper-shaped experiments: removal attacks, suspect zoos and the `evaluate` runs that
measure the guard and the audits. Above audit and guard.
"""
