"""Suite-wide settings."""

from hypothesis import settings

# CI must be repeatable: property tests draw the same examples every run
# (explore new ones locally with --hypothesis-seed=random).
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.load_profile("repeatable")
