"""The communication cost model (the analysis of ``pfl-mpi bench comm``, without MPI): the alpha-beta fit,
a round's messages predicted from a configuration, what a run file measured, tables, the result file and the plot.

The MPI sweep itself is ``pfl_mpi.comm.sweep`` (only ``pfl_mpi.comm`` imports mpi4py).
"""

from .fit import AlphaBeta, fit_alpha_beta
from .messages import Message, measured_round, predict_round, round_messages

__all__ = ["AlphaBeta", "Message", "fit_alpha_beta", "measured_round", "predict_round", "round_messages"]
