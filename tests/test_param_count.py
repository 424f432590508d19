"""The real-shape configs have exactly diffusers' parameter count, checked without allocating
anything: `jax.eval_shape` on our side, torch's meta device on theirs."""

import math
import os

import jax
import pytest

from mi_jax.config_utils import load_config
from mi_jax.convert.hunyuan import DIT_NAME_MAP, abstract_dit_params
from mi_jax.models import DiTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant", ["i2v", "i2v_33ch", "t2v"])
def test_real_shape_parameter_count_equals_diffusers(variant, torch):
    from diffusers import HunyuanVideoTransformer3DModel
    from flax import linen as nn

    config = DiTConfig.coerce(load_config(os.path.join(ROOT, "configs", f"hunyuan_video_i2v.py:{variant}")).model)
    abstract = nn.unbox(abstract_dit_params(config))
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))

    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel(**config.to_diffusers())
    theirs = sum(p.numel() for p in ref.parameters())
    assert ours == theirs
    assert 12.5e9 < ours < 13.5e9  # the 13B HunyuanVideo backbone

    # and the name map covers every tensor one to one
    from flax import traverse_util

    keys = set()
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        keys.update(DIT_NAME_MAP.torch_keys(path, leaf.shape))
    assert keys == set(ref.state_dict().keys())
