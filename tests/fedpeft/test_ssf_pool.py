"""FedIns' SSF pool on tiny random BERTs: selection against brute force, per-instance combination, what
trains and travels, the matching loss, per-example gradients against brute force, save/load, export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedpeft.adapters import PEFT_METHODS, adapter_state, apply_peft, load_adapter_state
from fedpeft.adapters.ssf_pool.config import CONFIG_NAME, SSFPoolConfig
from fedpeft.adapters.ssf_pool.model import SSFPoolModel
from fedpeft.adapters.state import adapter_kind
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.heads.modeling_fedins import PoolKeys, SSFPool, match_loss, pooled_query, select

IDS = torch.tensor([[1, 5, 7, 9, 11, 2], [1, 13, 17, 2, 0, 0], [1, 30, 31, 32, 33, 2], [1, 40, 2, 0, 0, 0]])
MASK = (IDS != 0).long()
LABELS = torch.tensor([0, 2, 1, 2])


def tiny_bert(dropout: float = 0.1) -> Any:
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, initializer_range=0.1, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    return AutoModelForSequenceClassification.from_config(config).eval()


def pool_model(size: int = 4, select_n: int = 2, dropout: float = 0.1, **cfg: Any) -> SSFPoolModel:
    torch.manual_seed(1)
    return apply_peft(tiny_bert(dropout), FedPeftConfig(peft="ssf-pool", ssf_pool_size=size, ssf_pool_select=select_n,
                                                         **cfg))


def scramble(model: SSFPoolModel, seed: int = 3) -> None:
    """Give every pool entry its own γ, β (a fresh pool is the identity in every entry)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SSFPool):
                module.scale.copy_(1 + 0.3 * torch.randn(module.scale.shape, generator=g))
                module.shift.copy_(0.3 * torch.randn(module.shift.shape, generator=g))


def test_registered_and_recognised() -> None:
    assert "ssf-pool" in PEFT_METHODS
    model = pool_model()
    state = adapter_state(model)
    assert adapter_kind(state) == "ssf-pool"
    assert state["ssf_pool.keys"].shape == (4, 32)
    pools = {k: v for k, v in state.items() if k.endswith((".ssf_pool.scale", ".ssf_pool.shift"))}
    assert len(pools) == 2 * 18  # every Linear and LayerNorm of the 2-layer BERT but the head, as SSF
    assert all(v.shape[0] == 4 for v in pools.values())
    assert set(state) - set(pools) - {"ssf_pool.keys"} == {"classifier.weight", "classifier.bias"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(state)


@pytest.mark.parametrize(("m", "n"), [(1, 1), (5, 1), (5, 3), (8, 8)])
def test_selection_is_the_brute_force_top_n_by_cosine(m: int, n: int) -> None:
    g = torch.Generator().manual_seed(m * 10 + n)
    keys = PoolKeys(m, 6)
    with torch.no_grad():
        keys.keys.copy_(torch.randn(m, 6, generator=g))
    query = torch.randn(7, 6, generator=g)
    weights, chosen = select(keys(query), n)
    for row in range(7):
        cos = [float(np.dot(query[row], keys.keys[i].detach()) / (np.linalg.norm(query[row])
                                                                  * np.linalg.norm(keys.keys[i].detach())))
               for i in range(m)]
        best = set(np.argsort(cos)[::-1][:n].tolist())
        assert set(chosen[row].tolist()) == best
        expected = np.zeros(m)
        expected[list(best)] = 1 / n
        np.testing.assert_allclose(weights[row].numpy(), expected.astype(np.float32), rtol=0, atol=0)


def test_each_input_gets_the_mean_of_its_chosen_entries() -> None:
    pool = SSFPool(3, 4)
    with torch.no_grad():
        pool.scale.copy_(torch.arange(12.0).reshape(3, 4))
        pool.shift.copy_(-torch.arange(12.0).reshape(3, 4))
    x = torch.randn(2, 5, 4)
    weights = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    y = pool(x, weights)
    gamma0, beta0 = (pool.scale[0] + pool.scale[2]) / 2, (pool.shift[0] + pool.shift[2]) / 2
    torch.testing.assert_close(y[0], x[0] * gamma0 + beta0)
    torch.testing.assert_close(y[1], x[1] * pool.scale[1] + pool.shift[1])


def test_a_fresh_pool_is_the_identity_and_the_query_is_the_frozen_models() -> None:
    base = tiny_bert()
    with torch.no_grad():
        plain = base(input_ids=IDS, attention_mask=MASK).logits
        query = pooled_query(base, IDS, MASK)
    model = pool_model()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, plain)
        scramble(model)
        torch.testing.assert_close(pooled_query(model.base_model, IDS, MASK), query)  # the pool is off for it
        assert not torch.allclose(model(input_ids=IDS, attention_mask=MASK).logits, plain)


def test_routing_is_per_instance_not_per_batch() -> None:
    model = pool_model(size=4, select_n=1)
    scramble(model)
    with torch.no_grad():
        model.ssf_pool.keys.copy_(pooled_query(model.base_model, IDS, MASK))  # input i's nearest key: key i
        together = model(input_ids=IDS, attention_mask=MASK).logits
        alone = torch.cat([model(input_ids=IDS[i:i + 1], attention_mask=MASK[i:i + 1]).logits for i in range(4)])
        chosen = select(model.ssf_pool(pooled_query(model.base_model, IDS, MASK)), 1)[1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert chosen.flatten().tolist() == [0, 1, 2, 3]  # each input its own entry


def test_matching_loss_trains_the_keys_and_only_chosen_entries_learn() -> None:
    model = pool_model(size=4, select_n=1)
    model.train()
    out = model(input_ids=IDS, attention_mask=MASK, labels=LABELS)
    with torch.no_grad():
        cosine = model.ssf_pool(pooled_query(model.base_model, IDS, MASK))
        chosen = select(cosine, 1)[1]
        torch.testing.assert_close(model.objective(out.loss),
                                   0.9 * out.loss + 0.1 * (1 - cosine.gather(1, chosen).sum(1)).mean())
    model.objective(out.loss).backward()
    used = set(chosen.flatten().tolist())
    assert model.ssf_pool.keys.grad[sorted(used)].abs().sum() > 0
    pool = next(m for m in model.modules() if isinstance(m, SSFPool))
    for entry in range(4):
        assert (pool.scale.grad[entry].abs().sum() > 0) == (entry in used)
    # CE alone does not reach the keys: the top-N choice is not differentiable
    model.zero_grad()
    model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss.backward()
    assert model.ssf_pool.keys.grad is None or model.ssf_pool.keys.grad.abs().sum() == 0


def test_match_loss_sums_the_chosen_cosines() -> None:
    cosine = torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.3, -0.1]])
    chosen = torch.tensor([[2, 0], [1, 0]])
    assert float(match_loss(cosine, chosen)) == pytest.approx(((1 - 1.4) + (1 - 0.5)) / 2)


def test_per_example_gradients_match_brute_force() -> None:
    """Opacus's hooks with fedpeft's rules for the pool and its keys give each example's own gradient."""
    from opacus import GradSampleModule

    import privacy.ssf_grad_sample  # noqa: F401  (registers the pool's and the keys' rules)

    model = pool_model(size=4, select_n=2, dropout=0.0)
    scramble(model)
    with torch.no_grad():
        model.ssf_pool.keys.copy_(torch.randn(4, 32, generator=torch.Generator().manual_seed(7)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    brute = []
    for i in range(len(IDS)):
        out = model(input_ids=IDS[i:i + 1], attention_mask=MASK[i:i + 1])
        loss = model.objective(torch.nn.functional.cross_entropy(out.logits, LABELS[i:i + 1]))
        brute.append(torch.autograd.grad(loss, params))
    wrapped = GradSampleModule(model, loss_reduction="sum", force_functorch=False)
    out = wrapped(input_ids=IDS, attention_mask=MASK)
    per_example = torch.nn.functional.cross_entropy(out.logits, LABELS, reduction="none")
    # objective() averages the matching loss over the batch: the sum over examples is n times it
    n, lam = len(IDS), model.pool_config.match_weight
    ((1 - lam) * per_example.sum() + lam * n * model._match).backward()
    checked = 0
    for j, p in enumerate(params):
        for i in range(n):
            torch.testing.assert_close(p.grad_sample[i], brute[i][j], rtol=1e-4, atol=1e-6)
        checked += 1
    wrapped._close()
    assert checked == len(params)
    assert any(isinstance(m, PoolKeys) for m in model.modules())


def test_state_round_trip_and_save_load(tmp_path: Path) -> None:
    model = pool_model()
    scramble(model)
    state = adapter_state(model)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / CONFIG_NAME).is_file()
    fresh = pool_model()
    load_adapter_state(fresh, state)
    reloaded = SSFPoolModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=MASK).logits
        torch.testing.assert_close(fresh(input_ids=IDS, attention_mask=MASK).logits, expected)
        torch.testing.assert_close(reloaded(input_ids=IDS, attention_mask=MASK).logits, expected)
    with pytest.raises(FedPeftError, match="state mismatch"):
        load_adapter_state(fresh, {k: v for k, v in state.items() if k != "ssf_pool.keys"})
    with pytest.raises(FedPeftError, match="cannot be folded"):
        model.merge_and_unload()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pool_size": 0}, "ssf_pool_size"),
    ({"pool_size": 2, "pool_select": 3}, "ssf_pool_select"),
    ({"pool_select": 0}, "ssf_pool_select"),
    ({"match_weight": 1.0}, "ssf_pool_match"),
    ({"match_weight": float("nan")}, "ssf_pool_match"),
])
def test_bad_pool_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SSFPoolConfig(**kwargs)
    fields = {"pool_size": "ssf_pool_size", "pool_select": "ssf_pool_select", "match_weight": "ssf_pool_match"}
    with pytest.raises(FedPeftError, match=message):
        FedPeftConfig(peft="ssf-pool", **{fields[k]: v for k, v in kwargs.items()})


def test_pool_settings_belong_to_ssf_pool() -> None:
    with pytest.raises(FedPeftError, match="ssf_pool_size is a ssf-pool setting"):
        FedPeftConfig(peft="ssf", ssf_pool_size=8)
    FedPeftConfig(peft="ssf-pool", ssf_target_modules="LayerNorm")  # shared with ssf


EXPORT_CHECK = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2])); mask = (ids != 0).long()
with torch.no_grad():
    print(json.dumps({"logits": model(input_ids=ids, attention_mask=mask).logits.tolist(),
                      "fedpeft": any(m.startswith(("fedpeft", "client", "server")) for m in sys.modules)}))
"""


def test_export_predicts_as_fedpeft_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """The mean-pooling head (MiniLM's): the export holds both code files (the [CLS] head: the simulation test)."""
    from transformers import AutoModel, BertConfig

    from fedpeft.heads import save_fedins_code
    from fedpeft.models import load_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, initializer_range=0.1)
    AutoModel.from_config(config).save_pretrained(tmp_path / "base")
    base, _ = load_model(str(tmp_path / "base"), num_labels=3, pooling="mean")
    torch.manual_seed(1)
    model = apply_peft(base, FedPeftConfig(peft="ssf-pool", ssf_pool_size=3, ssf_pool_select=2)).eval()
    scramble(model)
    with torch.no_grad():
        model.ssf_pool.keys.copy_(torch.randn(3, 32, generator=torch.Generator().manual_seed(9)))
        expected = model(input_ids=IDS, attention_mask=MASK).logits
    exported = model.to_exported()
    exported.save_pretrained(tmp_path / "out")
    save_fedins_code(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-I", "-c", EXPORT_CHECK, str(tmp_path / "out"), str(IDS.tolist())],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert not result["fedpeft"]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-6)
