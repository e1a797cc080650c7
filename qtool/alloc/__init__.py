"""Mixed precision: the exact allocation of schemes to a size budget."""
