"""The project's own one-node SLURM test cluster: start_slurm.sh, stop_slurm.sh and the slurm.py harness."""
