"""Suite-wide settings."""

from hypothesis import settings

# CI must be repeatable: property tests draw the same examples every run.
# Explore new ones locally with: ./run_tests.sh --hypothesis-profile=explore
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile("repeatable")
