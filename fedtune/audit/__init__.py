"""An empirical privacy audit in one run (``fedtune audit``): canaries, their scores, and the
lower bound on epsilon they give (Steinke et al. 2023; Mahloujifar et al. 2024)."""
