"""fedseg benchmarks (not tests): `python -m bench all [--quick] [--device cuda]`."""
