"""What the trainer keeps on each device after set-up is its share of the state, frozen inputs and sampler
inputs, nothing else, and exactly what ``plan`` reports as resident."""

import collections
import gc
import os

import jax
import pytest

from swiftbrush_jax import plan, setup
from swiftbrush_jax.parallel import sharding
from swiftbrush_jax.config_base import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fsdp8_config(name: str):
    path, _, arg = name.partition(":")
    config = load_config_file(os.path.join(ROOT, "configs", path), arg or None)
    config.mesh.data, config.mesh.fsdp, config.batch_size = 1, 8, 8
    return config


def live_bytes_per_device(exclude: set) -> dict:
    gc.collect()
    per_device = collections.Counter()
    for x in jax.live_arrays():
        if id(x) not in exclude:
            for shard in x.addressable_shards:
                per_device[shard.device] += shard.data.nbytes
    return per_device


@pytest.mark.parametrize("config_name", ["tiny.py", "shapes.py:v2_b"])
def test_each_device_holds_its_share_as_plan_reports(tmp_path, config_name):
    """8 simulated devices, FSDP 8: after the trainer's set-up, the bytes of every live array on each device
    are within 10% of every other device's and within 5% of plan's resident figure; no device keeps a
    whole float32 copy of the teacher (the largest single device would then hold far more). shapes.py:v2_b
    adds a LoRA student and the CLIP loss's frozen CLIP and decoder, which plan counts too."""
    assert len(jax.devices()) == 8
    config = fsdp8_config(config_name)
    gc.collect()
    before = {id(x) for x in jax.live_arrays()}
    run = setup.set_up(config, str(tmp_path / "work"))
    try:
        held = live_bytes_per_device(before)
        assert len(held) == 8, held
        configs, _ = plan.model_configs(config)
        pipe = plan.abstract_pipeline(configs)
        reported = plan.resident_bytes(config, pipe, plan.abstract_step(config, pipe, run.mesh))
        low, high = min(held.values()), max(held.values())
        assert high <= 1.1 * low, held
        for device, nbytes in held.items():
            assert abs(nbytes - reported["resident_bytes"]) <= 0.05 * reported["resident_bytes"], (device, nbytes,
                                                                                                  reported)
        # The figure is the sharded one: a whole student's state unsplit is over twice a device's share (the
        # tiny model's many small arrays stay whole; so do all of the shapes world's rank-32 adapters).
        assert config.student_lora.rank or reported["state_bytes"] * 2 < sharding.bytes_per_device(
            jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                  sharding=sharding.replicated(run.mesh)), run.state))
    finally:
        run.mngr.close()
