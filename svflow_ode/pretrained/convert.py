"""``from_pretrained``: a transformers model, checkpoint directory or state dict -> an SVFlow model.

The conversion builds the SVFlow skeleton for the config on the meta device, looks up every
parameter in the source's weight map, checks names and shapes, and fills the skeleton with copies:
the result is an independent ``nn.Module`` that needs no transformers object to run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..model import SVFlow
from . import bert, gpt2, llama
from .mapping import WeightMap

__all__ = ["from_pretrained", "SUPPORTED"]

# config.model_type -> the module that builds the skeleton and names its weights.
_ARCHITECTURES = {"bert": bert, "gpt2": gpt2, "llama": llama, "qwen2": llama}
SUPPORTED = tuple(_ARCHITECTURES)
_EXAMPLES = "BertModel, GPT2Model, GPT2LMHeadModel, LlamaModel, LlamaForCausalLM, Qwen2Model, Qwen2ForCausalLM"
# Architectures whose LM head is converted too (SVFlow.head; out.logits).
_LM_SUFFIXES = ("LMHeadModel", "ForCausalLM")


def from_pretrained(source, *, config=None) -> SVFlow:
    """Convert a Hugging Face transformers model into an SVFlow model.

    The converted model integrates in continuous time (parameters interpolated between layers,
    exactly layer k at t = k), so its defaults (Euler, one step per layer) reproduce the source's
    hidden states, and any other ``method``/``steps`` integrates the same field. Its
    ``hidden_states`` align with transformers' ``output_hidden_states`` (the last one after the
    final norm of pre-norm models).

    Args:
        source: a transformers model (BERT, GPT-2, Llama or Qwen2; base or LM-head class), a local
            checkpoint directory (``config.json`` with ``model.safetensors``, a sharded
            safetensors index or ``pytorch_model.bin``; read offline), or a state dict.
        config: the transformers config of a state-dict source (ignored otherwise).

    Returns:
        The SVFlow model in eval mode, with the source's dtype and device; with a ``head`` when
        the source is a causal LM (``...ForCausalLM``, ``GPT2LMHeadModel``).

    Raises:
        ValueError: unsupported architecture or option, or a weight of the wrong shape.
        KeyError: weights missing from the source (all of them are named).
        FileNotFoundError: a directory without a config or weights.
    """
    config, name, read_state = _open(source, config)
    arch = _ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise ValueError(
            f"cannot convert {name} (model_type {getattr(config, 'model_type', None)!r}): unsupported "
            f"architecture; supported model types: {', '.join(SUPPORTED)} ({_EXAMPLES})"
        )
    head = name.endswith(_LM_SUFFIXES)
    with torch.device("meta"):
        model = arch.build(config, head)
    _fill(model, arch.weight_map(config, head), read_state(), arch.PREFIX)
    if head and config.tie_word_embeddings:
        model.head.weight = model.embed.word.weight
    return model.eval()


def _open(source, config):
    """``(config, architecture name, state-dict reader)`` of any accepted source.

    The weights are read only once the architecture is known to be supported.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no config.json in {path!r}: not a transformers checkpoint directory")
        from transformers import AutoConfig  # a conversion needs transformers; a converted model does not

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return config, _config_name(config), lambda: _read_weights(path)
    if isinstance(source, nn.Module):
        if not hasattr(source, "config"):
            raise TypeError(f"expected a transformers model (with a .config), got {type(source).__name__}")
        return source.config, type(source).__name__, source.state_dict
    if isinstance(source, Mapping):
        if config is None:
            raise TypeError("a state-dict source needs config= (its transformers config)")
        return config, _config_name(config), lambda: source
    raise TypeError(
        f"expected a transformers model, a checkpoint directory or a state dict, got {type(source).__name__}"
    )


def _config_name(config) -> str:
    return (getattr(config, "architectures", None) or [type(config).__name__])[0]


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(os.path.join(path, shard)).items()}
    single, legacy = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no weights in {path!r}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _fill(model: nn.Module, weights: WeightMap, state: Mapping, prefix: str) -> None:
    """Load copies of the mapped source tensors into the meta skeleton, checking names and shapes."""
    # A model with a head (``...ForCausalLM``) keeps its base model under ``prefix``.
    if not any(k.startswith(prefix) for k in state):
        prefix = ""

    def key(theirs: str) -> str:
        return theirs if theirs.startswith("lm_head.") else prefix + theirs

    missing = sorted({key(theirs) for theirs, _ in weights.values()} - set(state))
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing) - 12} more)" if len(missing) > 12 else "")
        raise KeyError(f"the source is missing {len(missing)} weight(s) the conversion needs: {shown}")
    expected = dict(model.named_parameters(remove_duplicate=False))
    assert set(expected) == set(weights), f"weight map out of sync: {set(expected) ^ set(weights)}"
    loaded = {}
    for ours, (theirs, transform) in weights.items():
        t = state[key(theirs)].detach()
        t = t if transform is None else transform(t)
        if t.shape != expected[ours].shape:
            raise ValueError(
                f"weight {key(theirs)!r} has shape {tuple(state[key(theirs)].shape)}, which does not fit this "
                f"config (expected {tuple(expected[ours].shape)} for {ours})"
            )
        loaded[ours] = t.clone(memory_format=torch.contiguous_format)
    model.load_state_dict(loaded, strict=True, assign=True)
