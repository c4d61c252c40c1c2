"""Verification: parameter and FLOP accounting, and equivalence of two graphs."""

__all__: list[str] = []
