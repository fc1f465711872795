"""`python -m lorafuse.bench`: the benchmark CLI."""
