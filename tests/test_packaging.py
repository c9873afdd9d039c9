"""The core install (torch, geoopt, torchdiffeq) is enough for solvers, manifolds and SVFlow models."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("lightning", "wandb", "matplotlib", "transformers", "tqdm", "jsonargparse")

# Run in a fresh interpreter in which every optional package fails to import, as in a core-only venv.
SCRIPT = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ImportError(f"{{name}} is not part of the core install")
sys.meta_path.insert(0, Block())
import torch
import manifolds, solvers, svflow_ode
from svflow_ode.lm import SVFlowLM
model = SVFlowLM(vocab_size=10, d_model=16, n_heads=2, n_blocks=2, context=8)
ids = torch.randint(0, 10, (2, 8))
out = model(ids, method="rk4", steps=4)
assert out.logits.shape == (2, 8, 10) and out.stats.nfe == 32
adaptive = SVFlowLM(vocab_size=10, d_model=16, n_heads=2, n_blocks=2, context=8, method="dopri5", splitting="none")
assert adaptive(ids).stats.steps > 0
print("core ok")
"""


def test_the_core_runs_without_any_optional_package():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "core ok" in done.stdout


def test_the_core_dependencies_are_torch_geoopt_and_torchdiffeq_and_experiments_stay_out_of_the_wheel():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {dep.split("[")[0].split("=")[0].split(">")[0].split("<")[0] for dep in project["project"]["dependencies"]}
    assert names == {"torch", "torchdiffeq", "geoopt"}
    extras = project["project"]["optional-dependencies"]
    assert {"train", "pretrained", "experiments", "test"} <= set(extras)
    included = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(pattern.startswith("experiments") for pattern in included)
