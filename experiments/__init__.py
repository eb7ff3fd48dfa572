"""The paper's evaluation and ablations, and the benchmarks: python -m experiments.eval|ablate|bench."""
