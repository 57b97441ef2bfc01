"""Names shared by the writer and the reader of a run file (documented in docs/hdf5.md)."""

FORMAT = "pfl_mpi-run"
FORMAT_VERSION = 1
ROUNDS = "rounds"  # /rounds/<metric> [R]
CLIENTS = "clients"  # /clients/<metric> [R, N]
CLIENT_STATE = "clients/state"  # /clients/state/<name> [S, N, numel], /clients/state/round [S]
GLOBAL_STATE = "global/state"  # /global/state/<name> [S, numel], /global/state/round [S]
COMM = "comm"  # /comm/<field> [R, P, L]
RANKS = "ranks"  # /ranks/<field> [R, P]
PARTITION = "partition"
CHECKPOINT = "checkpoint"  # /checkpoint/slot0, /checkpoint/slot1: {server/<name>, clients/<name>}


def slot_of(round: int) -> str:
    """The checkpoint slot written by round ``round`` (rounds alternate, so the other slot stays intact)."""
    return f"{CHECKPOINT}/slot{round % 2}"
