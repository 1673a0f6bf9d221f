"""The VM pools' bookkeeping in the spawner (silo.spawner.core): which runs a pool serves,
and how many VMs the pools may hold. No VM boots here: pools boot from the loop."""

from __future__ import annotations

import dataclasses

import pytest

from silo.model import plan as p
from silo.model.errors import SpecError
from silo.spawner import core


def _plan(memory: int = 512, hostname: str = "silo", argv: tuple[str, ...] = ("true",)) -> p.Plan:
    vm = p.Vm(kernel="/k", initramfs="/i", accel="tcg", memory=memory, cpus=1, skeleton="/s",
              binds=(("usr", "/usr"),), rwsize=1 << 30, jail_id=1000065536, hostname=hostname)
    proc = p.Process(argv=argv, env=(("PATH", "/bin"),), cwd="/", uid=0, gid=0)
    return p.Plan(isolation="vm", namespaces=(), uid_map=(), gid_map=(), ops=(), process=proc, vm=vm)


def test_a_pool_serves_runs_of_its_machine_whatever_their_command_and_hostname() -> None:
    assert core.vm_key(_plan()) == core.vm_key(_plan(hostname="box", argv=("sh", "-c", "x")))
    assert core.vm_key(_plan()) != core.vm_key(_plan(memory=256))
    assert core.vm_key(_plan()) != core.vm_key(dataclasses.replace(
        _plan(), vm=dataclasses.replace(_plan().vm, kernel="/other")))


def test_pools_hold_at_most_pool_max_vms_together() -> None:
    spawner = core.Spawner()
    try:
        assert spawner.set_pool(_plan(), 10, ("--isolation", "vm")) is not None
        with pytest.raises(SpecError, match=f"at most {core.POOL_MAX} VMs together"):
            spawner.set_pool(_plan(memory=256), core.POOL_MAX - 9, ("--isolation", "vm", "--memory", "256M"))
        assert [row[:2] for row in spawner.pool_status()] == [(("--isolation", "vm"), 10)]
        assert spawner.set_pool(_plan(), 0, ("--isolation", "vm")) is None
        assert spawner.pool_status() == []
    finally:
        spawner.shutdown()
