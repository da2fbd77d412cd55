"""A single process needs no process group: every collective of ``World`` degrades to the one-rank answer."""

from __future__ import annotations

import pytest
import torch

from tadq.distributed import World, distributed_world, launched_by_torchrun, resolve_device
from tadq.distributed.world import TORCHRUN_VARIABLES


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_without_torchrun_nothing_is_initialised(no_torchrun: None) -> None:
    assert not launched_by_torchrun()
    with distributed_world("cpu") as world:
        assert (world.rank, world.world_size, world.distributed, world.is_main) == (0, 1, False, True)
        assert not torch.distributed.is_initialized()


def test_a_one_process_torchrun_job_stays_single(no_torchrun: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert launched_by_torchrun()
    with distributed_world("cpu") as world:
        assert not world.distributed and not torch.distributed.is_initialized()


def test_single_process_collectives() -> None:
    world = World()
    world.barrier()
    assert world.broadcast({"a": 1}) == {"a": 1}
    assert world.gather(3) == [3]
    assert world.on_main(lambda: "done") == "done"
    with pytest.raises(ValueError, match="boom"):
        world.on_main(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_device_choice() -> None:
    assert resolve_device("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto", 1) == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda", 0)
    with pytest.raises(ValueError, match="auto"):
        resolve_device("tpu", 0)


def test_unjoined_torchrun_job_raises_instead_of_duplicating_work(no_torchrun: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="distributed_world"):
        World.current("cpu")
