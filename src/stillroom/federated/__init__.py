"""Federated distillation: the non-IID split, client and server updates (core), rounds in one
process (engine), and the Flower apps (flower: imported only with the `federated` extra)."""
