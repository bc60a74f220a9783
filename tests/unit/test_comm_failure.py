"""A collective that fails because a peer went away is one line (cli: exit 1); anything else keeps its traceback."""

import torch.distributed as dist

from dist_cnn.distributed.process_group import comm_failure

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
