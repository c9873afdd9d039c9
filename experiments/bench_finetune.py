"""Step time of fine-tuning a converted all-MiniLM-L6-v2 student against the same student built from scratch.

Both are ``LitFineTune`` students with three parameter sets (the study's layers 0, 2, 4; Heun x3
by default), distilled from the real converted MiniLM (objective "both", its forward pass
included in every step) on the same MiniLM-tokenised Tiny Shakespeare batches:

- converted: ``student(from_pretrained(MiniLM), layers)``, the teacher's weights copied;
- from scratch: the same architecture built by the BERT skeleton builder on the CPU (the module
  constructors' random initialisation), then ``student(...)`` of it: same shapes, own tensors.

A step is Lightning's whole training step (forward, backward, AdamW), timed by a callback from
batch start to batch end, in wall-clock time and in the CPU time of the one thread that runs it
(one torch thread, no data-loading workers): on cores shared with other jobs the CPU time is what
the step costs, the wall time adds the waits for a core. The two are trained in alternating rounds
(converted first in even rounds, last in odd ones) so that load from other jobs falls on both;
each round's first step is a warm-up and not counted. The ratio of the medians is the claim
(target <= 1.1). The teacher's forward pass alone is timed too: the share of each step that
distillation adds.

    python -m experiments.bench_finetune [--rounds 4] [--steps 6] [--method heun] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from transformers import AutoConfig

from experiments.minilm_compression import DATA, LAYERS, TEACHER
from svflow_ode.pretrained import bert, student
from svflow_ode.training.finetune import LitFineTune, teacher_path
from svflow_ode.training.prepare import prepare
from svflow_ode.training.tokens import TokenDataModule

CONVERTED, SCRATCH = "converted MiniLM student", "same student from scratch"


class StepTimer(L.Callback):
    """``(wall, thread CPU)`` seconds of each training step, batch start to batch end (optimizer step included)."""

    def __init__(self):
        self.seconds: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter(), time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append((time.perf_counter() - self._start[0], time.thread_time() - self._start[1]))


def modules(method: str, steps: int, context: int) -> dict[str, LitFineTune]:
    """The converted student's module and the same module with a student built from scratch."""
    options = dict(teacher=TEACHER, layers=LAYERS, method=method, steps=steps, objective="both", context=context)
    converted, scratch = LitFineTune(**options), LitFineTune(**options)
    torch.manual_seed(0)
    skeleton = bert.build(AutoConfig.from_pretrained(teacher_path(TEACHER)), head=False)
    scratch.model = student(skeleton, LAYERS, method=method, steps=steps).float().train()
    scratch.model.context = context
    assert [p.shape for p in scratch.model.parameters()] == [p.shape for p in converted.model.parameters()]
    return {CONVERTED: converted, SCRATCH: scratch}


def step_times(module: LitFineTune, data: TokenDataModule, steps: int) -> list[tuple[float, float]]:
    """``(wall, CPU)`` seconds of ``steps`` training steps of ``module`` after one warm-up step."""
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    return timer.seconds[1:]


@torch.no_grad()
def teacher_seconds(module: LitFineTune, data: TokenDataModule, repeats: int) -> float:
    """Median CPU seconds of the teacher's forward pass on a training batch."""
    input_ids, _ = data.draw(data.batch_size, torch.Generator().manual_seed(0), "train")
    times = []
    for _ in range(repeats + 1):
        start = time.thread_time()
        module.teacher(input_ids)
        times.append(time.thread_time() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark, print and write the table; returns the CPU-time ratio (converted / from scratch)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per module")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--method", default="heun", help="the students' solver")
    parser.add_argument("--solver-steps", type=int, default=3, help="the students' step count")
    parser.add_argument("--batch", type=int, default=12, help="windows per batch")
    parser.add_argument("--context", type=int, default=64, help="tokens per window")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = DATA
        if not (path / "meta.json").is_file():  # the study's data, else a copy made here
            path = Path(tmp) / "data"
            prepare(["tinyshakespeare"], str(path), tokenizer=teacher_path(TEACHER), progress=False)
        data = TokenDataModule(str(path), context=args.context, batch_size=args.batch, val_size=args.batch)
        built = modules(args.method, args.solver_steps, args.context)
        times = {name: [] for name in built}
        for round_ in range(args.rounds):
            order = list(built.items()) if round_ % 2 == 0 else list(built.items())[::-1]
            for name, module in order:
                times[name] += step_times(module, data, args.steps)
        teacher = teacher_seconds(built[CONVERTED], data, 2 * args.steps)
    wall = {name: [w for w, _ in ts] for name, ts in times.items()}
    cpu = {name: [c for _, c in ts] for name, ts in times.items()}
    medians = {name: statistics.median(ts) for name, ts in cpu.items()}
    ratio = medians[CONVERTED] / medians[SCRATCH]
    wall_ratio = statistics.median(wall[CONVERTED]) / statistics.median(wall[SCRATCH])
    lines = [
        "# Fine-tuning a converted MiniLM: step time against the same student from scratch",
        "",
        f"`python -m experiments.bench_finetune --rounds {args.rounds} --steps {args.steps} --method {args.method} "
        f"--solver-steps {args.solver_steps} --batch {args.batch} --context {args.context}`, torch "
        f"{torch.__version__}, 1 torch thread, {os.cpu_count()} CPU cores (shared with other jobs while measured).",
        "",
        f"Students of all-MiniLM-L6-v2 with its layers {list(LAYERS)} as parameter sets, {args.method} x "
        f"{args.solver_steps}, distilled (objective `both`: the teacher's forward pass is in every step) on "
        f"batches of {args.batch} x {args.context} MiniLM tokens of Tiny Shakespeare; Lightning training steps "
        f"(forward, backward, AdamW) in {args.rounds} alternating rounds of {args.steps} timed steps each.",
        "",
        "| student | CPU s per step (median) | min | max | wall s per step (median) | steps |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {medians[name]:.3f} | {min(cpu[name]):.3f} | {max(cpu[name]):.3f} | "
          f"{statistics.median(wall[name]):.3f} | {len(cpu[name])} |" for name in times),
        "",
        f"Ratio converted / from scratch: **{ratio:.3f}** in CPU time (target <= 1.1); {wall_ratio:.3f} in wall "
        f"time, which adds the waits for a core shared with other jobs' load of the moment.",
        "",
        f"The teacher's forward pass alone: {teacher:.3f} CPU s per batch (median), "
        f"{teacher / medians[CONVERTED]:.0%} of a converted student's step.",
        "",
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune_bench.md").write_text("\n".join(lines))
    return ratio


if __name__ == "__main__":
    main()
