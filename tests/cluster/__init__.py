"""The project's own SLURM test clusters (one node, or N namespace nodes on one machine): start_slurm.sh,
stop_slurm.sh, node.sh (the nodes' namespaces, crash, cut, heal) and the slurm.py harness."""
