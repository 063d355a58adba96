"""The example catalog, shipped as package data: `featureplane up --demo` runs from a wheel."""

__all__: list[str] = []
