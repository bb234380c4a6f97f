"""Helpers for the test suite: a fake Hugging Face Hub and a cache built through it."""
