"""Layer-wise bit allocation: sensitivity statistics, orderings, the knapsack solver, and the on-disk cache."""
