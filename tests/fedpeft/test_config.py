"""FedPeftConfig: defaults, validation, parsing from run configs, round trips, immutability."""

from __future__ import annotations

import dataclasses
import re

import pytest

from fedpeft.config import FedPeftConfig, field_help
from fedpeft.errors import FedPeftError


def test_defaults_are_valid() -> None:
    cfg = FedPeftConfig()
    assert cfg.peft == "lora"
    assert cfg.strategy == "fedit"
    assert cfg.partition == "iid"
    assert 0 < cfg.fraction <= 1
    assert 0 < cfg.test_fraction < 1


def test_every_field_has_help() -> None:
    helps = field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(FedPeftConfig)}
    assert all(isinstance(h, str) and h for h in helps.values())


POSITIVE_INTS = ["lora_r", "lora_alpha", "max_length", "clients", "rounds", "local_epochs", "batch_size",
                 "eval_batch_size", "client_cpus", "fair_iterations"]

INVALID = [
    *[(name, 0) for name in POSITIVE_INTS],
    *[(name, -3) for name in POSITIVE_INTS],
    ("lora_dropout", -0.1),
    ("lora_dropout", 1.0),
    ("test_fraction", 0.0),
    ("test_fraction", 1.0),
    ("test_fraction", -0.5),
    ("fraction", 0.0),
    ("fraction", 1.5),
    ("fraction", -0.2),
    ("max_local_steps", -1),
    ("lr", 0.0),
    ("lr", -1e-3),
    ("weight_decay", -0.01),
    ("head_lr", -0.1),
    ("head_lr", float("inf")),
    ("round_timeout", 0.0),
    ("round_timeout", -5.0),
    ("text_column", ""),
    ("label_column", ""),
    ("fair_lambda", -1e-3),
    ("fair_lambda", float("nan")),
    ("client_ranks", "0,4"),
    ("client_ranks", "4,9"),  # above lora_r = 8
    ("client_ranks", "4,x"),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_out_of_range_value_raises_naming_field(name: str, value: object) -> None:
    with pytest.raises(FedPeftError, match=name):
        FedPeftConfig(**{name: value})


VALID_EDGES = [
    ("lora_dropout", 0.0),
    ("lora_dropout", 0.99),
    ("fraction", 1.0),
    ("fraction", 1e-6),
    ("test_fraction", 0.999),
    ("max_local_steps", 0),
    ("weight_decay", 0.0),
    ("head_lr", 0.0),
    ("clients", 1),
]


@pytest.mark.parametrize(("name", "value"), VALID_EDGES, ids=[f"{n}={v!r}" for n, v in VALID_EDGES])
def test_boundary_values_accepted(name: str, value: object) -> None:
    assert getattr(FedPeftConfig(**{name: value}), name) == value


def test_text_and_label_columns_must_differ() -> None:
    with pytest.raises(FedPeftError, match="text_column and label_column"):
        FedPeftConfig(text_column="x", label_column="x")


def test_from_mapping_accepts_kebab_and_snake_case() -> None:
    cfg = FedPeftConfig.from_mapping({"local-epochs": 3, "max_local_steps": 7, "lora-target-modules": "query"})
    assert cfg.local_epochs == 3
    assert cfg.max_local_steps == 7
    assert cfg.lora_target_modules == "query"


def test_from_mapping_coerces_types() -> None:
    cfg = FedPeftConfig.from_mapping({"rounds": "3", "lr": 3, "fraction": "0.25", "clients": 4.0, "seed": "-2"})
    assert cfg.rounds == 3 and type(cfg.rounds) is int
    assert cfg.lr == 3.0 and type(cfg.lr) is float
    assert cfg.fraction == 0.25 and type(cfg.fraction) is float
    assert cfg.clients == 4 and type(cfg.clients) is int
    assert cfg.seed == -2


def test_from_mapping_unknown_key_lists_known_ones() -> None:
    with pytest.raises(FedPeftError, match="unknown config key 'roundz'") as info:
        FedPeftConfig.from_mapping({"roundz": 3})
    message = str(info.value)
    for name in ("rounds", "clients", "lora_r", "partition"):
        assert name in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("rounds", "three"), ("rounds", 2.5), ("rounds", True), ("lr", "fast"), ("lr", True), ("model", 3),
     ("partition", 1.0), ("clients", None), ("seed", [1])],
)
def test_from_mapping_rejects_wrong_types(key: str, value: object) -> None:
    with pytest.raises(FedPeftError, match=key):
        FedPeftConfig.from_mapping({key: value})


def test_from_mapping_still_validates_ranges() -> None:
    with pytest.raises(FedPeftError, match="fraction"):
        FedPeftConfig.from_mapping({"fraction": "0"})


def test_from_mapping_empty_gives_defaults() -> None:
    assert FedPeftConfig.from_mapping({}) == FedPeftConfig()


def test_to_dict_from_mapping_round_trip() -> None:
    cfg = FedPeftConfig(model="/m", lora_r=4, lora_alpha=32, lora_dropout=0.1, lora_target_modules="q,v",
                        data="x.csv", text_column="body", label_column="y", test_fraction=0.2,
                        partition="dirichlet:0.3", clients=7, rounds=2, fraction=1.0, lr=5e-4, seed=11,
                        max_local_steps=0, round_timeout=12.5, out="runs/x")
    as_dict = cfg.to_dict()
    assert set(as_dict) == {f.name for f in dataclasses.fields(FedPeftConfig)}
    assert FedPeftConfig.from_mapping(as_dict) == cfg
    kebab = {k.replace("_", "-"): v for k, v in as_dict.items()}
    assert FedPeftConfig.from_mapping(kebab) == cfg


def test_to_json_round_trip() -> None:
    import json

    cfg = FedPeftConfig(rounds=9, lr=0.02)
    assert FedPeftConfig.from_mapping(json.loads(cfg.to_json())) == cfg


def test_frozen() -> None:
    cfg = FedPeftConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3  # type: ignore[misc]
    changed = dataclasses.replace(cfg, rounds=3)
    assert changed.rounds == 3 and cfg.rounds == 5


def test_replace_validates() -> None:
    with pytest.raises(FedPeftError, match="clients"):
        dataclasses.replace(FedPeftConfig(), clients=0)


def test_client_ranks_parse_and_fractional_alpha() -> None:
    from fedpeft.config import parse_ranks

    assert parse_ranks("") == [] and parse_ranks("2, 4,8") == [2, 4, 8]
    cfg = FedPeftConfig.from_mapping({"client-ranks": "2,8", "lora-alpha": "0.5", "fair-lambda": "1e-4"})
    assert cfg.client_ranks == "2,8" and cfg.lora_alpha == 0.5 and cfg.fair_lambda == 1e-4


# --- privacy fields -----------------------------------------------------------------------------------

def test_dp_config_from_flower_run_config_keys() -> None:
    cfg = FedPeftConfig.from_mapping({"dp": "local", "dp-epsilon": 3, "dp-delta": 1e-5, "dp-clipping": "ghost",
                                      "run-id": "study-7"})
    assert (cfg.dp, cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clipping, cfg.run_id) == ("local", 3.0, 1e-5, "ghost",
                                                                                     "study-7")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dp": "local", "dp_epsilon": 1.0, "dp_delta": 0.0}, "dp_epsilon needs dp_delta"),
    ({"dp": "central", "dp_epsilon": 1.0, "dp_delta": 1.5}, "dp_epsilon needs dp_delta in (0, 1)"),
    ({"dp": "local", "dp_delta": 1e-5}, "dp needs a budget or a noise level"),
    ({"dp_delta": 1e-6}, "dp_delta is set but dp is off"),
    ({"dp_clipping": "ghost"}, "dp_clipping is set but dp is off"),
    ({"dp": "local", "dp_epsilon": -1.0, "dp_delta": 1e-5}, "dp_epsilon must be a finite number >= 0"),
    ({"dp": "local", "dp_epsilon": float("inf"), "dp_delta": 1e-5}, "dp_epsilon must be a finite number >= 0"),
    ({"dp": "local", "dp_noise_multiplier": -0.5, "dp_delta": 1e-5}, "dp_noise_multiplier must be"),
    ({"dp": "central", "dp_epsilon": 8.0, "dp_delta": 1e-5, "strategy": "rolora"}, "strategy rolora under dp central"),
])
def test_dp_config_errors_name_the_field(kwargs: dict, message: str) -> None:
    """A value out of its range fails when the config is built; a combination, in the run's one check."""
    from server.checks import check_config

    with pytest.raises(FedPeftError, match=re.escape(message)):
        check_config(FedPeftConfig(**kwargs))


def test_dp_with_only_a_noise_level_has_no_budget() -> None:
    from privacy.modes import privacy_mode

    cfg = FedPeftConfig(dp="local", dp_noise_multiplier=1.2, dp_delta=1e-5)
    described = privacy_mode(cfg).describe(cfg)
    assert "no epsilon budget" in described and "sigma 1.2" in described
    assert privacy_mode(FedPeftConfig()).describe(FedPeftConfig()) == "no differential privacy"


def test_the_flower_app_config_lists_every_field_at_its_default() -> None:
    """`flwr run --run-config` can only set keys the app declares: every field is declared, at its default."""
    import dataclasses
    import tomllib
    from pathlib import Path

    from fedpeft.config import FedPeftConfig

    app = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    declared = app["config"]
    assert list(declared) == [f.name.replace("_", "-") for f in dataclasses.fields(FedPeftConfig)]
    assert FedPeftConfig.from_mapping(declared) == FedPeftConfig()


LM = {"task": "causal-lm", "model": "/models/llama", "data": "chat.jsonl"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": "regression"}, "task must be one of seq-cls, causal-lm"),
    ({"task": "causal-lm", "data": "chat.jsonl"}, "task causal-lm needs --model"),
    ({"task": "causal-lm", "model": "/models/llama"}, "task causal-lm needs --data"),
    ({**LM, "text_column": "prompt"}, "text_column is a seq-cls setting but task is causal-lm"),
    ({**LM, "head_lr": 0.1}, "head_lr is a seq-cls setting"),
    ({**LM, "partition": "dirichlet:0.5"}, "causal-lm data has no labels"),
    ({**LM, "canaries": 10}, "canaries .* seq-cls only"),
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
    ({"precision": "fp8"}, "precision must be one of auto, fp32, bf16"),
    ({"client_gpus": -0.5}, "client_gpus must be a finite number >= 0"),
    ({"client_gpus": 0.5, "device": "cpu"}, "client_gpus reserves GPUs"),
    ({"gradient_checkpointing": True, "dp": "local", "dp_epsilon": 8.0, "dp_delta": 1e-5},
     "gradient_checkpointing under local DP"),
])
def test_task_and_device_errors_are_one_line(kwargs: dict, message: str) -> None:
    from server.checks import check_config

    with pytest.raises(FedPeftError, match=message):
        check_config(FedPeftConfig(**kwargs))


def test_causal_lm_config_and_boolean_coercion() -> None:
    cfg = FedPeftConfig(**LM, partition="natural:site", gradient_checkpointing=True, client_gpus=0.5)
    assert cfg.task == "causal-lm" and cfg.gradient_checkpointing
    for text, value in (("true", True), ("False", False), ("1", True), ("off", False)):
        assert FedPeftConfig.from_mapping({"gradient-checkpointing": text}).gradient_checkpointing is value
    with pytest.raises(FedPeftError, match="gradient_checkpointing must be of type bool"):
        FedPeftConfig.from_mapping({"gradient-checkpointing": "maybe"})


@pytest.mark.parametrize(("fields", "probes"), [
    ({"rounds": 10}, 2), ({"rounds": 7}, 1), ({"rounds": 2}, 1),  # a fifth, rounded, at least one
    ({"rounds": 10, "probe_rounds": 0}, 0), ({"rounds": 10, "probe_rounds": 3}, 3),
    ({"rounds": 10, "peft": "ssf", "strategy": "ssf-avg"}, 0),  # measured for LoRA only
    ({"rounds": 10, "task": "causal-lm", "model": "some/llama", "data": "chat.jsonl"}, 0),  # no head to probe
])
def test_auto_probe_rounds(fields: dict, probes: int) -> None:
    assert FedPeftConfig(**fields).probes == probes


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"strategy": "lora-fair"}, "strategy lora-fair needs each site's factors"),
    ({"strategy": "exact-svd"}, "strategy exact-svd needs each site's factors"),
    ({"codec": "topk:0.3+int4"}, "codec topk:0.3+int4 encodes each site's update its own way"),
    ({"dp": "central", "dp_epsilon": 8.0, "secagg_clip": 2.0}, "under central DP the sites clip their update to"),
    ({"robust": "median"}, "robust median reads each site's update"),
    ({"max_update_norm": 5.0}, "the coordinator cannot check or clip one site's masked update"),
    ({"clip_update_norm": 1.0}, "the coordinator cannot check or clip one site's masked update"),
    ({"drift": "scaffold"}, "drift scaffold sends each site's change"),
    ({"client_ranks": "4,8", "strategy": "exact-svd"}, "strategy exact-svd needs each site's factors"),
    ({"client_ranks": "4,8", "strategy": "fedit"}, None),  # refused by the rule's own rank check first
    ({"clients": 1, "min_clients": 1}, "it sums at least 2 sites a round"),
    ({"clients": 4, "fraction": 0.5, "secagg_threshold": 3}, "secagg_threshold 3 exceeds the 2 sites"),
])
def test_secure_aggregation_refuses_what_needs_one_sites_update(kwargs: dict, message: str | None) -> None:
    from server.checks import check_config

    with pytest.raises(FedPeftError, match=re.escape(f"secure aggregation: {message}") if message else None) as err:
        check_config(FedPeftConfig(secure_aggregation=True, **kwargs))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [{}, {"strategy": "ffa-lora"}, {"strategy": "rolora"},
                                    {"peft": "ssf", "strategy": "ssf-avg"}, {"server_opt": "adam"},
                                    {"dp": "local", "dp_epsilon": 8.0}, {"drift": "fedprox:0.01"},
                                    {"dp": "central", "dp_epsilon": 8.0}])
def test_secure_aggregation_runs_with_every_linear_rule_and_local_dp(kwargs: dict) -> None:
    from fedpeft.drift import resolve_drift
    from server.checks import check_config

    cfg = FedPeftConfig(secure_aggregation=True, **kwargs)
    check_config(cfg)
    assert resolve_drift(FedPeftConfig(secure_aggregation=True)).method == "none"  # auto: no second upload


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"secagg_clip": 0.0}, "secagg_clip must be a finite number > 0"),
    ({"secagg_bits": 33}, "secagg_bits must lie in 2..32"),
    ({"secagg_threshold": 1}, "secagg_threshold must be 0 (a majority) or at least 2"),
])
def test_bad_secure_aggregation_settings_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(FedPeftError, match=re.escape(message)):
        FedPeftConfig(**kwargs)
