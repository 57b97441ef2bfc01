"""pfl_mpi: personalised federated learning simulated on MPI collectives."""

__version__ = "0.1.0"
