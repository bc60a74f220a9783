"""A collective that fails because a peer went away is one line (cli: exit 1); anything else keeps its traceback.
Rank 0's one-time setup has its own bound (--setup-timeout), apart from the collectives' --timeout."""

import time

import torch
import torch.distributed as dist

from dist_cnn.distributed import process_group as D
from dist_cnn.distributed.process_group import comm_failure
from tests.support.dist import run_group

GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
    "[10.77.0.2]:45769: Connection reset by peer. This is typically caused by a remote worker hanging "
    "or bugs in the application. Check the logs of the remote worker before reporting an error."
)


def test_gloo_peer_reset_is_one_line_naming_the_peer():
    msg = comm_failure(RuntimeError(GLOO_RESET))
    assert msg.startswith(
        "lost contact with another process of the job (Read error [10.77.0.2]:45769: Connection reset by peer)"
    )
    assert "\n" not in msg and "pair.cc" not in msg and "typically" not in msg


def test_timeouts_and_torch_network_errors_count():
    assert comm_failure(
        RuntimeError(
            "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 60000ms for recv operation to complete"
        )
    )
    assert "n1:29500" in comm_failure(dist.DistNetworkError("failed to connect to n1:29500"))


def test_other_errors_are_not_peer_failures():
    assert comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert comm_failure(ValueError("Connection reset by peer")) is None


def test_an_nccl_timeout_after_the_watchdog_aborted_is_one_line():
    text = (
        "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=42, OpType=ALLREDUCE, "
        "NumelIn=4, NumelOut=4, Timeout(ms)=30000) ran for 30012 milliseconds before timing out."
    )
    assert comm_failure(RuntimeError(text)).startswith("lost contact with another process of the job ([Rank 0]")
    assert comm_failure(RuntimeError("NCCL communicator was aborted on rank 1."))


def test_nccl_error_handling_is_set_unless_the_user_chose():
    env = {}
    assert D.nccl_error_handling(env) == "2" and env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    mine = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert D.nccl_error_handling(mine) == "1"


SLOW_SETUP = 4.0  # seconds of rank 0's (or rank 1's) one-time work: longer than the group's timeout below


def slow_setup(env):
    """Rank 0's setup and then rank 1's own loading outlast the group's 2 s timeout; the setup group
    (its own bound) waits for both, and the next collective on the main group starts only after."""
    D.make_setup_group(60)
    try:
        listed = D.rank0_only(env, lambda: time.sleep(SLOW_SETUP) or ["a", "b"])
        loaded = D.rank0_then_all(env, lambda: time.sleep(SLOW_SETUP if env.rank == 1 else 0) or env.rank)
        t = torch.ones(1)
        dist.all_reduce(t)
        return {"listed": listed, "loaded": loaded, "sum": t.item()}
    finally:
        D._SETUP_GROUP = None


def test_rank_0_setup_longer_than_timeout_is_waited_for_on_its_own_bound(tmp_path):
    ranks = run_group(2, slow_setup, tmp_dir=tmp_path, timeout_s=2)
    assert ranks == [{"listed": ["a", "b"], "loaded": r, "sum": 2.0} for r in (0, 1)]
