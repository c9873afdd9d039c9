"""The data modules: splits, vocabulary, targets correct by construction, determinism."""

import re

import pytest
import torch

from svflow_ode.training import (
    IGNORE, AssociativeRecallDataModule, CharDataModule, DyckDataModule, GaussianMixtureDataModule,
)
from svflow_ode.training.data import _StepBatches, seeded_generator

TEXT = "the quick brown fox jumps over the lazy dog\n" * 10  # 440 characters


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_char_split_vocabulary_and_windows(text_file):
    dm = CharDataModule(str(text_file), context=8, batch_size=4, val_size=16)
    assert dm.vocab == "".join(sorted(set(TEXT))) and dm.vocab_size == len(set(TEXT))
    assert dm.n_train == int(0.9 * len(TEXT))
    decode = lambda ids: "".join(dm.vocab[i] for i in ids.tolist())  # noqa: E731
    val_text = TEXT[dm.n_train :]
    inputs, labels = dm.val_set().tensors
    assert inputs.shape == labels.shape == (16, 8)
    for x, y in zip(inputs, labels):
        # A window of the validation split, its labels shifted by one character.
        assert decode(x) + decode(y)[-1:] in val_text and decode(y)[:-1] == decode(x)[1:]
    x, _ = dm.draw(32, seeded_generator(1), "train")
    assert all(decode(row) in TEXT[: dm.n_train] for row in x)
    test_inputs, test_labels = dm.test_set().tensors
    assert len(test_inputs) == (len(val_text) - 1) // 8
    assert decode(test_inputs.flatten()) == val_text[: len(test_inputs) * 8]
    assert decode(test_labels.flatten()) == val_text[1 : len(test_inputs) * 8 + 1]


def test_char_vocabulary_travels_with_the_state(text_file, tmp_path):
    dm = CharDataModule(str(text_file), context=8)
    CharDataModule(str(text_file), context=8).load_state_dict(dm.state_dict())  # same file: accepted
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    with pytest.raises(ValueError, match="vocabulary"):
        CharDataModule(str(other), context=8).load_state_dict(dm.state_dict())


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        CharDataModule(str(tmp_path / "nowhere.txt"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"text\x00\x01\x02", "looks binary (a NUL byte at offset 4): CharDataModule reads text"),
        ("café au lait".encode("latin-1"), "is not UTF-8 text: byte 0xe9 at offset 3 (invalid continuation byte)"),
        (b"0123456789", "the training split has 9 characters, fewer than context + 1 = 17"),
    ],
)
def test_unusable_text_files_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}")) as info:
        CharDataModule(str(path), context=16)
    assert message in str(info.value)


@pytest.mark.parametrize("make, message", [
    (lambda path: CharDataModule(path, context=0), "need context >= 1 and 0 < train_fraction < 1, got 0, 0.9"),
    (lambda path: CharDataModule(path, train_fraction=float("nan")), "0 < train_fraction < 1, got 64, nan"),
    (lambda path: DyckDataModule(context=0), "context >= 1, got 3, 8, 0.5, 0"),
    (lambda path: CharDataModule(path, seed=-1), "seed must be >= 0, got -1"),
    (lambda path: AssociativeRecallDataModule(seed=-1), "seed must be >= 0, got -1"),
])
def test_settings_that_would_fail_mid_run_are_refused_when_built(text_file, make, message):
    # Each used to be accepted and fail at the first batch (an empty window; a negative seed).
    with pytest.raises(ValueError) as info:
        make(str(text_file))
    assert message in str(info.value)


def test_validation_is_fixed_and_training_is_step_seeded(text_file):
    dm = CharDataModule(str(text_file), context=8, val_size=16)
    assert torch.equal(dm.val_set().tensors[0], dm.val_set().tensors[0])
    stream = lambda first, rank=0: iter(_StepBatches(dm.draw, 4, 0, rank, lambda: first))  # noqa: E731
    from_zero = stream(0)
    batches = [next(from_zero)[0] for _ in range(4)]
    assert torch.equal(next(stream(3))[0], batches[3])  # resuming at step 3 continues the stream
    assert not torch.equal(batches[0], batches[1])
    assert not torch.equal(next(stream(0, rank=1))[0], batches[0])  # each DDP rank its own


def test_associative_recall_targets_by_hand():
    dm = AssociativeRecallDataModule(n_pairs=5, n_queries=3, n_keys=10, n_values=7, val_size=64)
    P, Q = 5, 3
    assert dm.vocab_size == 17 and dm.context == 2 * (P + Q) - 1
    inputs, labels = dm.val_set().tensors
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0 : 2 * P : 2], x[1 : 2 * P : 2]
        assert len(set(keys)) == P and all(k < 10 for k in keys)
        assert all(10 <= v < 17 for v in values)
        bound = dict(zip(keys, values))
        scored = [i for i, label in enumerate(y) if label != IGNORE]
        assert scored == [2 * P + 2 * q for q in range(Q)]  # exactly the query keys
        for i in scored:
            assert y[i] == bound[x[i]]  # the value bound to the queried key
            if i + 1 < len(x):
                assert x[i + 1] == y[i]  # the answer follows its query


def test_associative_recall_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="n_pairs <= n_keys"):
        AssociativeRecallDataModule(n_pairs=8, n_keys=4)


def test_dyck_labels_are_the_matching_closers():
    dm = DyckDataModule(n_types=3, context=40, max_depth=4, val_size=64)
    inputs, labels = dm.val_set().tensors
    for x, y in zip(inputs.tolist(), labels.tolist()):
        stack = []
        for i, token in enumerate(x):
            if token < 3:
                stack.append(token)
                assert len(stack) <= 4
            else:
                assert stack and token == 3 + stack.pop()  # a valid Dyck prefix
            if y[i] != IGNORE:
                assert y[i] == 3 + stack[-1]  # the next token closes the innermost bracket
            nxt = x[i + 1] if i + 1 < len(x) else None
            if nxt is not None:
                assert (y[i] != IGNORE) == (nxt >= 3) and (y[i] == IGNORE or y[i] == nxt)
    assert (labels != IGNORE).float().mean() > 0.2


def test_gaussian_mixture_points_follow_their_components():
    dm = GaussianMixtureDataModule(n_components=3, radius=4.0, sigma=0.5, n_train=3000, n_val=300)
    x, labels = dm.train_set.tensors
    assert x.shape == (3000, 2) and set(labels.tolist()) == {0, 1, 2}
    for k in range(3):
        assert torch.allclose(x[labels == k].mean(0), dm.means[k], atol=0.1)
    assert torch.equal(dm.val_set.tensors[0], GaussianMixtureDataModule(3, 4.0, 0.5, 3000, 300).val_set.tensors[0])
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (256, 2)


def test_shipped_corpus_is_tiny_shakespeare_by_name():
    """The configs name the shipped corpus; it is the standard file (length, vocabulary) and the split holds."""
    dm = CharDataModule("tinyshakespeare", context=64, val_size=12)
    assert len(dm.data) == 1_115_394 and dm.vocab_size == 65
    assert dm.n_train == int(0.9 * 1_115_394)
    import hashlib
    from svflow_ode.training.data import CORPORA
    assert hashlib.md5(CORPORA["tinyshakespeare"].read_bytes()).hexdigest() == "6fb458f1232090904fb40fe944165e91"
