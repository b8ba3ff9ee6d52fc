"""The typed requests a site receives (fedpeft.protocol): only the site's settings travel, a request is
parsed once per message, another protocol version or an unknown key is refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedpeft import protocol
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.protocol import (
    CANARIES,
    CLIPPING_NORM,
    CONFIG,
    FROZEN,
    HELD,
    LEDGER_SEQ,
    PROTOCOL,
    PROTOCOL_VERSION,
    SERVER_ROUND,
    SITE_SETTINGS,
    QueryRequest,
    TrainRequest,
    request_record,
    train_request,
)

NON_DEFAULT = FedPeftConfig(
    model="/models/tiny", peft="lora", lora_r=3, lora_alpha=6, lora_dropout=0.25, lora_target_modules="q,v",
    data="/data/x.csv.gz", text_column="body", label_column="stars", test_fraction=0.3, max_length=64,
    partition="natural:hospital", clients=4, rounds=2, fraction=1.0, round_timeout=30.0, local_epochs=3,
    max_local_steps=0, batch_size=4, lr=2e-4, weight_decay=0.01, eval_batch_size=8, client_cpus=1, seed=42,
    out="runs/test", strategy="lora-fair", server_opt="adam", server_lr=0.3, min_clients=2, short_round="stop",
    max_update_norm=5.0, robust="median", downlink_codec="int8",
)
# The coordinator's own settings are not sent; a site sees them at their defaults.
AS_SITES_SEE_IT = FedPeftConfig(**{f.name: getattr(NON_DEFAULT, f.name) for f in dataclasses.fields(FedPeftConfig)
                                   if f.name in SITE_SETTINGS})


def test_only_the_site_settings_travel() -> None:
    record = request_record(NON_DEFAULT, label_names=["neg", "pos"])
    sent = {k.removeprefix("fedpeft.") for k in record if k.startswith("fedpeft.")}
    assert sent == SITE_SETTINGS
    for coordinators in ("out", "resume", "strategy", "server_opt", "server_lr", "fraction", "min_clients",
                         "round_timeout", "short_round", "max_update_norm", "robust", "downlink_codec"):
        assert coordinators not in sent
    request = QueryRequest.from_record(record)
    assert request.settings == AS_SITES_SEE_IT and request.label_names == ("neg", "pos")
    assert request.settings != NON_DEFAULT  # what stayed home is at its default there


def test_a_train_request_round_trips_through_flowers_serialisation() -> None:
    record = request_record(NON_DEFAULT, label_names=["neg", "pos"], **{
        SERVER_ROUND: 3, FROZEN: "lora_A", HELD: "lora_B,x", CANARIES: '[["a canary", "pos"]]', LEDGER_SEQ: 2,
        CLIPPING_NORM: 0.5})
    decoded = recorddict_from_proto(recorddict_to_proto(RecordDict({CONFIG: record})))
    request = TrainRequest.from_record(decoded.config_records[CONFIG])
    assert request == TrainRequest(settings=AS_SITES_SEE_IT, label_names=("neg", "pos"), server_round=3,
                                   frozen=("lora_A",), held=("lora_B", "x"), canaries=(["a canary", "pos"],),
                                   ledger_seq=2)
    assert request.untrained == ("lora_A", "lora_B", "x")


def test_a_request_key_is_checked_when_the_coordinator_writes_it() -> None:
    with pytest.raises(ValueError, match="not a request key: server_round"):
        request_record(NON_DEFAULT, label_names=[], server_round=1)


@pytest.mark.parametrize("version", [1, 3, None])
def test_another_wire_version_is_refused_in_one_line(version: int | None) -> None:
    record = dict(request_record(FedPeftConfig(), label_names=["a"], **{SERVER_ROUND: 1}))
    if version is None:
        del record[PROTOCOL]
    else:
        record[PROTOCOL] = version
    with pytest.raises(FedPeftError, match=f"protocol version {version}; this fedpeft reads version "
                                           f"{PROTOCOL_VERSION}") as err:
        TrainRequest.from_record(record)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["fedpeft.strategy", "fedpeft.roundz", "server_round"])
def test_a_key_the_protocol_does_not_define_is_refused(key: str) -> None:
    record = dict(request_record(FedPeftConfig(), label_names=["a"], **{SERVER_ROUND: 1}))
    record[key] = 1
    with pytest.raises(FedPeftError, match=f"does not define: {key.removeprefix('fedpeft.')}"):
        TrainRequest.from_record(record)


def test_a_malformed_train_request_says_what() -> None:
    record = request_record(FedPeftConfig(), label_names=["a"])  # no server-round
    with pytest.raises(FedPeftError, match="malformed train request: KeyError"):
        TrainRequest.from_record(record)


def test_a_request_is_parsed_once_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[object] = []
    plain = TrainRequest.from_record.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(TrainRequest, "from_record",
                        classmethod(lambda cls, record: parsed.append(record) or plain(cls, record)))
    monkeypatch.setattr(protocol, "_last", None)
    one = RecordDict({CONFIG: request_record(FedPeftConfig(), label_names=["a"], **{SERVER_ROUND: 1})})
    other = RecordDict({CONFIG: ConfigRecord(dict(one[CONFIG]))})  # equal, but another message's record
    first = train_request(one)
    assert train_request(one) is first and train_request(one) is first  # the codec mod, clipping, the handler
    assert len(parsed) == 1
    assert train_request(other) == first and len(parsed) == 2
