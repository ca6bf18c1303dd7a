"""rank_faults: which failures count as a lost peer, and how the stopping rank names the one at fault."""
import pytest
import torch.distributed as dist

from scdm.runtime import rank_faults

GLOO_RESET = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:29347: "
              "Connection reset by peer. This is typically caused by a remote worker hanging")


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_vanished_peer_in_ddp_bucket_rebuild_is_a_lost_peer(one_rank_group):
    """DDP's bucket rebuild raises a plain RuntimeError, collectives a DistBackendError: both count."""
    line = rank_faults.lost_peer_message(RuntimeError(GLOO_RESET))
    assert line.startswith("rank 0: another rank stopped or died during a collective operation (")
    assert rank_faults.lost_peer_message(RuntimeError("CUDA out of memory")) is None
    assert rank_faults.lost_peer_message(ValueError(GLOO_RESET)) is None


def test_the_line_names_the_rank_that_reported_its_fault(one_rank_group, monkeypatch):
    store = dist.HashStore()
    monkeypatch.setattr(rank_faults, "_store", lambda: store)
    assert rank_faults.lost_peer_message(RuntimeError(GLOO_RESET)).startswith("rank 0: another rank")
    store.set(rank_faults.FAULT_KEY, "rank 1 (DatasetError)")
    assert rank_faults.lost_peer_message(RuntimeError(GLOO_RESET)) == \
        "stopping all ranks: rank 1 (DatasetError) failed (see its error)"
