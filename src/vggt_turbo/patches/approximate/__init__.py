"""Approximations (``Tier.APPROXIMATE``): they change the computation, opt-in and in the ``fast`` preset only."""
