"""altlora benchmarks: each module exposes ``run(device, quick) -> list[dict]``; ``python -m bench`` runs them."""
