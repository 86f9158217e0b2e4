"""Memory-budget benchmarking: sweeps, the measured physical limit, and peers."""
