"""Wav2Vec2 <-> transformers `Wav2Vec2Model` / `Wav2Vec2ForCTC` folders (safetensors)."""

from __future__ import annotations

import os

from flax import linen as nn

from mi_jax.convert.name_map import NameMap, import_params
from mi_jax.convert.safetensors_io import SafetensorsFolder, read_json
from mi_jax.models.wav2vec2 import Wav2Vec2Config, abstract_params
from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings

# Where transformers keeps the weight-norm factors of the positional conv: torch's
# `parametrizations.weight_norm` (what transformers 5 saves) or the older `weight_norm`
# hook (`weight_g` / `weight_v`, e.g. the Hub's facebook/wav2vec2-base-960h).
_PARAMETRIZED = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def wav2vec2_name_map(prefix: str = "", parametrized_weight_norm: bool = True) -> NameMap:
    """Flax paths of `mi_jax.models.wav2vec2.Wav2Vec2` -> transformers keys.

    prefix: "wav2vec2." for task models (`Wav2Vec2ForCTC`, ...), "" for `Wav2Vec2Model`.
    parametrized_weight_norm: transformers 5 naming of the positional conv's weight norm
      (`...conv.parametrizations.weight.original0/1`) rather than `...conv.weight_g/_v`.
    """
    renames = [
        (r"\bconv_layers_(\d+)\b", r"conv_layers.\1"),
        (r"^pos_conv_embed\.", "encoder.pos_conv_embed.conv."),
        (r"^encoder_layers\.", "encoder.layers."),  # the scanned stack, already `encoder_layers.{i}`
        (r"^encoder_layer_norm\.", "encoder.layer_norm."),
    ]
    if parametrized_weight_norm:
        renames += [(rf"\.conv\.{old}$", f".conv.{new}") for old, new in _PARAMETRIZED.items()]
    if prefix:
        renames.append((r"^", prefix))
    return NameMap(renames=tuple(renames), stacked=("encoder_layers",))


def load_transformers_wav2vec2(path: str, dtype=None, *, mesh=None, rules=DEFAULT_RULES):
    """Reads a transformers Wav2Vec2 folder (config.json + model.safetensors) into
    `(Wav2Vec2Config, params)` for `Wav2Vec2(config).apply({"params": params}, ...)`.

    Accepts `Wav2Vec2Model` as well as task models (`Wav2Vec2ForCTC`, `...ForPreTraining`,
    whose heads are skipped) and both weight-norm key styles. dtype: parameter dtype (default
    float32). mesh: place the parameters sharded by their logical axis names. Raises
    `CheckpointError` for unreadable folders (pickle-only ones included) and
    `WeightMismatchError` listing every missing / unexpected / mis-shaped key.
    """
    config = Wav2Vec2Config.from_transformers(read_json(os.path.join(path, "config.json")))
    tensors = SafetensorsFolder(path, "model")
    prefix = "wav2vec2." if any(k.startswith("wav2vec2.") for k in tensors) else ""
    old_style = f"{prefix}encoder.pos_conv_embed.conv.weight_g" in tensors
    name_map = wav2vec2_name_map(prefix, parametrized_weight_norm=not old_style)

    def ignored(key: str) -> bool:
        # task heads (lm_head, quantizer, ...) sit outside the prefix; masked_spec_embed is
        # the SpecAugment mask vector, used in training only
        return not key.startswith(prefix) or key == f"{prefix}masked_spec_embed"

    abstract = abstract_params(config)
    shardings = logical_shardings(abstract, mesh, rules) if mesh is not None else None
    params = import_params(
        nn.unbox(abstract), tensors, name_map, source=path, shardings=shardings, dtype=dtype,
        ignore_unexpected=ignored,
    )
    return config, params
