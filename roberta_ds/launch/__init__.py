"""Processes: who am I (rank, world, rendezvous from SLURM/MPI/torchrun), signals, watchdog, run lock, faults."""
