"""fedtune's benchmarks: what privacy costs in time, traffic and accuracy (see ../RESULTS.md)."""
