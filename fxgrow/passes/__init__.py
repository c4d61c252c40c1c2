"""Graph passes. Each takes a GraphModule and returns a new one; the input is never mutated."""

__all__: list[str] = []
