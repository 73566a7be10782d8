"""Side-by-side benchmarks (``python -m elm.bench``): every number is a ratio measured in one run."""
