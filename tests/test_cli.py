"""Bad input to ``fedpeft simulate`` gives a one-line error naming the problem, exit 2, no traceback.

Every case here is caught before any simulation process starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.cli.main import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["simulate", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "/no/such/file.jsonl"], "data file not found: /no/such/file.jsonl"),
        (["--text-column", "review"], "text column 'review' not in"),
        (["--label-column", "sentiment"], "label column 'sentiment' not in"),
        (["--partition", "by-hospital"], "unknown partition spec 'by-hospital'"),
        (["--partition", "dirichlet:-2"], "dirichlet needs a positive alpha"),
        (["--partition", "natural:site"], "partition column 'site' not in the data"),
        (["--clients", "1000"], "1000 clients but only 360 training examples"),
        (["--partition", "natural:movie", "--clients", "3"], "pass --clients"),
        (["--fraction", "1.5"], "fraction must be in (0, 1]"),
        (["--rounds", "0"], "rounds must be >= 1"),
        (
            ["--strategy", "fedmagic"],
            "unknown strategy 'fedmagic'; known: exact-svd, fedavg, fedins, fedit, ffa-lora, lora-fair, lora-fair-ab, "
            "lora-fair-ridge, rolora, ssf-avg",
        ),
        (["--peft", "prefix"], "unknown PEFT method 'prefix'; known: lora, ssf"),
        (["--peft", "ssf", "--strategy", "fedit"],
         "strategy 'fedit' aggregates LORA adapters, but this adapter is SSF; use --strategy ssf-avg"),
        (["--strategy", "ssf-avg"],
         "strategy 'ssf-avg' aggregates SSF adapters, but this adapter is LORA; use --strategy exact-svd or fedit or "
         "ffa-lora"),
        (["--peft", "ssf", "--lora-r", "4"], "lora_r is a lora setting but peft is ssf; drop it or use --peft lora"),
        (["--ssf-target-modules", "query"], "ssf_target_modules is a ssf setting but peft is lora"),
        (["--peft", "ssf", "--client-ranks", "2,4"], "client_ranks is a lora setting but peft is ssf"),
        (["--lora-dynamic-rank", "--strategy", "lora-fair"],
         "strategy lora-fair reads whole factors (products, QR or SVD), so the components a round does not train "
         "would change; with lora_dynamic_rank use fedit, fedavg, ffa-lora"),
        (["--lora-dynamic-rank", "--lora-rank-min", "9"], "lora_rank_min must lie in 1..lora_r=8, got 9"),
        (["--lora-dynamic-rank", "--lora-rank-min", "0"], "lora_rank_min must lie in 1..lora_r=8, got 0"),
        (["--lora-rank-min", "2"], "lora_rank_min is the lowest rank lora_dynamic_rank draws; add --lora-dynamic-rank"),
        (["--lora-dynamic-rank", "--client-ranks", "2,4"], "lora_dynamic_rank with client_ranks"),
        (["--peft", "ssf", "--lora-dynamic-rank"], "lora_dynamic_rank is a lora setting but peft is ssf"),
        (["--model", "./no-such-model"], "model path not found: ./no-such-model"),
        (["--client-cpus", "4096"], "client_cpus 4096 exceeds"),
        (["--dp-epsilon", "3"], "dp_epsilon is set but dp is off; add --dp local or --dp central"),
        (["--dp", "local", "--dp-epsilon", "3", "--dp-delta", "0"], "dp_epsilon needs dp_delta in (0, 1), got 0"),
        (["--dp", "--dp-delta", "2"], "dp_epsilon needs dp_delta in (0, 1), got 2"),
        (["--dp", "central", "--dp-delta", "1e-5"], "dp needs a budget or a noise level"),
        (["--dp", "secret"], "dp must be one of off, local, central, got 'secret'"),
        (["--dp", "--dp-clipping", "flat"], "dp_clipping must be one of hooks, ghost"),
        (["--dp", "--dp-accountant", "gdp"], "dp_accountant must be one of prv, rdp"),
        (["--dp", "--dp-max-grad-norm", "0"], "dp_max_grad_norm must be a finite number > 0"),
        (["--dp", "central", "--dp-epsilon", "8", "--dp-delta", "1e-5", "--strategy", "exact-svd"],
         "strategy 'exact-svd' is not post-processing of the noised average"),
        (["--codec", "zip"],
         "codec: unknown codec 'zip' in 'zip'; known: compeft, fp16, int4, int8, none, shared, ternary, topk"),
        (["--codec", "topk:7"], "codec: topk:<fraction> needs a fraction in (0, 1], got '7'"),
        (["--codec", "int8+topk:0.1"], "'topk' chooses which values are sent, so it must come first"),
        (["--downlink-codec", "ternary"], "downlink_codec cannot be a sparsifier"),
        (["--downlink-delta"], "name a lossy one"),
        (["--min-clients", "0"], "min_clients must lie in 1..clients=10, got 0"),
        (["--robust", "krum"], "robust must be none, median or trimmed:<beta>, got 'krum'"),
        (["--robust", "trimmed:0.7"], "trimmed:<beta> needs a share in (0, 0.5)"),
        (["--robust", "median", "--strategy", "lora-fair"], "strategy 'lora-fair' does not average"),
        (["--dp", "central", "--dp-epsilon", "8", "--dp-delta", "1e-5", "--robust", "median"],
         "robust aggregation under central DP"),
        (["--min-clients", "11"], "min_clients must lie in 1..clients=10, got 11"),
        (["--min-clients", "6"], "min_clients 6 exceeds the 5 clients sampled per round (10 x fraction 0.5)"),
        (["--short-round", "wait"], "short_round must be one of skip, retry, stop"),
        (["--round-retries", "-1"], "round_retries must be >= 0"),
        (["--max-update-norm", "-2"], "max_update_norm must be a finite number >= 0"),
        (["--max-norm-ratio", "0.5"], "max_norm_ratio must be 0 (off) or a finite number > 1"),
        (["--clip-update-norm", "-1"], "clip_update_norm must be a finite number >= 0 (0: off)"),
        (["--dp", "central", "--dp-epsilon", "8", "--dp-delta", "1e-5", "--clip-update-norm", "1"],
         "clip_update_norm under central DP: the server already clips every update"),
        (["--startup-timeout", "0"], "startup_timeout must be > 0 seconds"),
        (["--dp", "--short-round", "retry"], "short_round=retry would have sites train, and spend privacy budget"),
        (["--dp", "central", "--dp-epsilon", "8", "--dp-delta", "1e-5", "--max-norm-ratio", "10"],
         "max_norm_ratio compares sites with each other"),
        (["--server-opt", "sgd"], "server_opt must be one of none, avgm, adagrad, adam, yogi, got 'sgd'"),
        (["--server-lr", "0.1"], "server_lr is set but server_opt is none"),
        (["--server-opt", "adam", "--server-lr", "-1"], "server_lr must be a finite number > 0"),
        (["--server-opt", "avgm", "--server-momentum", "1"], "server_momentum must lie in [0, 1)"),
        (["--server-opt", "adam", "--server-beta2", "1.5"], "server_beta2 must lie in [0, 1)"),
        (["--server-opt", "yogi", "--server-tau", "0"], "server_tau must be a finite number > 0"),
        (["--drift", "fedprox"], "drift must be auto, none, fedprox:<mu>"),
        (["--drift", "fedprox:-0.1"], "drift must be auto, none, fedprox:<mu>"),
        (["--drift", "scaffold:2"], "drift must be auto, none, fedprox:<mu>"),
        (["--dp", "--drift", "fedprox:0.1"], "drift fedprox:0.1 under local DP"),
        (["--dp", "central", "--dp-epsilon", "8", "--dp-delta", "1e-5", "--drift", "scaffold"],
         "drift scaffold under central DP"),
        (["--drift", "scaffold", "--strategy", "exact-svd", "--client-ranks", "2,8"],
         "drift scaffold with client_ranks"),
        (["--label-correction", "logit"], "label_correction must be none, balanced[:tau] or fedlc[:tau]"),
        (["--label-correction", "fedlc:0"], "tau must be a finite number > 0"),
        (["--dp", "--label-correction", "balanced"], "label_correction balanced under local DP"),
        (["--head-after-probe", "drop"], "head_after_probe must be one of train, freeze"),
        (["--head-after-probe", "freeze", "--probe-rounds", "0"], "head_after_probe freeze keeps the probed head"),
        (["--secure-aggregation", "--strategy", "lora-fair"], "secure aggregation: strategy lora-fair needs each"),
        (["--secure-aggregation", "--codec", "int8"], "secure aggregation: codec int8 encodes each site's update"),
        (["--secure-aggregation", "--robust", "median"], "secure aggregation: robust median reads each site's"),
        (["--secure-aggregation", "--drift", "scaffold"], "secure aggregation: drift scaffold sends each site's"),
        (["--secure-aggregation", "--secagg-threshold", "9"], "secagg_threshold 9 exceeds the 5 sites sampled"),
        (["--secagg-bits", "64"], "secagg_bits must lie in 2..32, got 64"),
        (["--peft", "ssf-pool", "--ssf-pool-size", "0"], "ssf_pool_size (M) must be an integer >= 1, got 0"),
        (["--peft", "ssf-pool", "--ssf-pool-size", "2", "--ssf-pool-select", "3"],
         "ssf_pool_select (N) must be an integer in 1..ssf_pool_size=2, got 3"),
        (["--peft", "ssf-pool", "--ssf-pool-match", "1"], "ssf_pool_match (lambda) must lie in [0, 1), got 1.0"),
        (["--ssf-pool-size", "8"], "ssf_pool_size is a ssf-pool setting but peft is lora"),
        (["--peft", "ssf-pool", "--strategy", "ssf-avg"],
         "strategy 'ssf-avg' aggregates SSF adapters, but this adapter is SSF-POOL; use --strategy fedins"),
        (["--peft", "ssf-pool", "--gradient-checkpointing"],
         "gradient_checkpointing with peft ssf-pool: the forward recomputed in the backward pass"),
        (["--peft", "ssf-pool", "--dp", "local", "--dp-clipping", "ghost"],
         "dp_clipping ghost with peft ssf-pool: ghost clipping clips only the criterion's loss"),
    ],
)
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], small_data: Path, tmp_path: Path,
                               args: list[str], expected: str) -> None:
    if "--data" not in args:
        args = ["--data", str(small_data), *args]
    code, err = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fedpeft: error: ")
    assert expected in err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_unusable_paths_are_one_line(capsys: pytest.CaptureFixture[str], small_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{not json\n')
    (tmp_path / "no-config").mkdir()
    cases = [
        (["--data", str(small_data), "--out", str(small_data)], "is a file; give a directory for the run"),
        (["--data", str(bad), "--out", str(tmp_path / "r")], f"cannot parse {bad}"),
        (["--model", str(tmp_path / "no-config"), "--out", str(tmp_path / "r")], "has no config.json"),
    ]
    for args, expected in cases:
        code, err = run_cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and expected in err, (args, err)
    assert not (tmp_path / "r").exists()


def test_single_class_labels(capsys: pytest.CaptureFixture[str], one_class_data: Path, tmp_path: Path) -> None:
    code, err = run_cli(capsys, "--data", str(one_class_data), "--out", str(tmp_path / "run"))
    assert code == 2 and "needs at least 2 classes, found one (good)" in err


def test_existing_run_dir_is_not_overwritten(
    capsys: pytest.CaptureFixture[str], small_data: Path, tmp_path: Path
) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    code, err = run_cli(capsys, "--data", str(small_data), "--out", str(tmp_path))
    assert code == 2 and "already holds a run" in err
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("args", [["simulate", "--no-such-flag"], ["simulate", "--rounds", "three"], ["launch"]])
def test_wrong_flags_print_usage_not_traceback(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "usage: fedpeft" in proc.stderr and "Traceback" not in proc.stderr


def test_dp_flag_alone_means_local_with_the_dp_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.main import build_parser
    from fedpeft.config import DP_DEFAULTS

    args = build_parser().parse_args(["simulate", "--dp", "--rounds", "2"])
    assert args.dp == "local" and args.rounds == 2
    assert DP_DEFAULTS["dp_delta"] > 0 and DP_DEFAULTS["dp_epsilon"] > 0  # epsilon never without delta
    assert build_parser().parse_args(["simulate", "--dp", "central"]).dp == "central"


def test_dp_defaults_fill_only_what_the_user_left_unset() -> None:
    from fedpeft.cli.main import dp_defaults
    from fedpeft.config import DP_DEFAULTS, FedPeftConfig

    given = {"dp": "local", "rounds": 2, "lr": 5e-4}
    merged = {**dp_defaults(given), **given}
    assert merged["rounds"] == 2 and merged["lr"] == 5e-4
    assert merged["head_lr"] == DP_DEFAULTS["head_lr"] and merged["dp_epsilon"] == DP_DEFAULTS["dp_epsilon"]
    # a noise level of the user's own takes no epsilon from the preset (sigma would not fit it); delta it does
    own = {"dp": "local", "dp_noise_multiplier": 1.0}
    assert "dp_epsilon" not in dp_defaults(own) and dp_defaults(own)["dp_delta"] == DP_DEFAULTS["dp_delta"]
    # one flag: an epsilon alone keeps the preset's delta
    one = {"dp": "local", "dp_epsilon": 3.0}
    config = FedPeftConfig(**{**dp_defaults(one), **one})
    assert (config.dp_epsilon, config.dp_delta) == (3.0, DP_DEFAULTS["dp_delta"])
    # the probe follows --rounds unless set
    assert merged["probe_rounds"] == 2 and FedPeftConfig(**merged).probe_rounds == 2
    assert FedPeftConfig(dp="local", **DP_DEFAULTS).head_lr == DP_DEFAULTS["head_lr"]  # the preset validates


def test_help_lists_the_main_flags() -> None:
    proc = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "simulate", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--clients", "--rounds", "--fraction", "--local-epochs", "--batch-size", "--lr", "--data",
                 "--text-column", "--label-column", "--partition", "--seed", "--out"):
        assert flag in proc.stdout


def test_peft_ssf_brings_its_own_strategy_and_drops_the_lora_dp_preset() -> None:
    from fedpeft.cli.main import with_defaults
    from fedpeft.config import DP_DEFAULTS, FedPeftConfig

    assert with_defaults({"peft": "ssf"})["strategy"] == "ssf-avg"
    assert with_defaults({"peft": "ssf", "strategy": "fedavg"})["strategy"] == "fedavg"  # the user's own choice
    assert "strategy" not in with_defaults({"rounds": 2})  # LoRA keeps the config default
    dp = with_defaults({"peft": "ssf", "dp": "local"})
    assert dp["strategy"] == "ssf-avg" and "lora_r" not in dp and "lora_alpha" not in dp
    assert dp["head_lr"] == DP_DEFAULTS["head_lr"] and dp["dp_epsilon"] == DP_DEFAULTS["dp_epsilon"]
    FedPeftConfig(**dp)  # validates
    assert with_defaults({"dp": "local"})["strategy"] == DP_DEFAULTS["strategy"] == "ffa-lora"


# --- deployment commands ---------------------------------------------------------------------------

def test_deployment_commands_print_what_they_would_run(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       small_data: Path) -> None:
    assert main(["certs", str(tmp_path / "c"), "--san", "127.0.0.1", "--node", "site-a"]) == 0
    capsys.readouterr()
    assert main(["link", "--certs", str(tmp_path / "c"), "--state-dir", str(tmp_path / "s"), "--print"]) == 0
    link = capsys.readouterr().out
    assert link.startswith("flower-superlink ") and "--enable-supernode-auth" in link
    assert not (tmp_path / "s").exists()  # --print starts nothing and creates nothing
    args = ["node", "--link", "127.0.0.1:9092", "--ca", str(tmp_path / "c" / "ca.crt"), "--key",
            str(tmp_path / "c" / "nodes" / "site-a.key"), "--data", str(small_data),
            "--state-dir", str(tmp_path / "st")]
    assert main([*args, "--print"]) == 0
    worker, node = capsys.readouterr().out.splitlines()  # the site worker first, then the SuperNode it serves
    secret = tmp_path / "st" / "worker" / "superexec.secret"  # the worker takes the SuperNode's tasks itself
    assert worker.endswith(f"-m client.worker --state-dir {tmp_path / 'st'} --runtime-api 127.0.0.1:9094 "
                           f"--secret-file {secret}")
    assert node.endswith(f"--isolation process --superexec-auth-secret-file {secret}")
    assert not secret.exists()  # --print makes no secret
    # the SuperNode asks for messages every 0.5 s while idle (Flower's own waits 3 s): fedpeft's entry point
    assert node.startswith(f"{sys.executable} -m fedpeft.deploy.supernode --poll 0.5 --superlink ")
    assert f'data-path="{small_data}"' in node and "worker=1" in node
    assert f'state-dir="{tmp_path / "st"}"' in node  # the worker's task file and ready file are there
    assert main([*args, "--no-worker", "--poll", "3", "--print"]) == 0
    (node,) = capsys.readouterr().out.splitlines()  # --poll 3: Flower's own SuperNode, as it is
    assert node.startswith("flower-supernode ") and "worker" not in node
    assert main([*args, "--poll", "0", "--print"]) == 2 and "--poll must be > 0" in capsys.readouterr().err
    assert main([*args, "--device", "cuda", "--precision", "bf16", "--print"]) == 0  # this site's GPU
    node = capsys.readouterr().out.splitlines()[-1]
    assert 'device="cuda"' in node and 'precision="bf16"' in node
    with pytest.raises(SystemExit) as exited:  # argparse: usage and one line, exit 2
        main([*args, "--device", "tpu", "--print"])
    assert exited.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "expected"), [
    (["certs", "{tmp}/c", "--node", "a/b"], "node name 'a/b' must be"),
    (["certs", "{tmp}/c", "--san", "not valid!"], "--san 'not valid!' is neither"),
    (["link", "--certs", "{tmp}/none", "--state-dir", "{tmp}/s"], "CA certificate not found"),
    (["link", "--certs", "{tmp}/c0", "--state-dir", "{tmp}/s", "--fleet", "9092"], "--fleet must be HOST:PORT"),
    (["node", "--link", "h:1", "--ca", "{tmp}/c0/ca.crt", "--key", "{tmp}/c0/nodes/a.key", "--data", "{tmp}/x"],
     "site data file not found"),
    (["node", "--link", "h:1", "--ca", "{tmp}/c0/ca.crt", "--key", "{tmp}/c0/nodes/a.key", "--data", "{tmp}/c0/ca.crt",
      "--codec", "zip"], "--codec: unknown codec 'zip'"),
    (["connection", "x y", "--control", "h:1", "--ca", "{tmp}/c0/ca.crt"], "connection name 'x y' must be"),
    (["certs", "{tmp}/c0", "--node", "a"], "already exist"),
])
def test_deployment_commands_refuse_bad_input_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                          expected: str) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert main(["certs", str(tmp_path / "c0"), "--node", "a"]) == 0
    capsys.readouterr()
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("fedpeft: error: ") and expected in err, err


def test_help_examples_are_real_commands() -> None:
    """Every example in ``fedpeft simulate --help`` parses with the real parser; string flags say what they take."""
    import shlex

    from fedpeft.cli.main import _EXAMPLES, build_parser

    parser = build_parser()
    commands = [line.split("   ")[0].strip() for line in _EXAMPLES.splitlines()[1:]]
    for command in commands:
        for part in command.split("&&"):
            argv = shlex.split(part)
            assert argv[0] == "fedpeft"
            parser.parse_args(argv[1:])  # exits (a failure) on an unknown flag or a bad value
    text = parser._subparsers._group_actions[0].choices["simulate"].format_help()
    for flag in ("--data FILE", "--model DIR|NAME", "--codec SPEC", "--resume RUN_DIR", "--quiet", "--json"):
        assert flag in text


def test_causal_lm_input_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_data: Path,
                                              tiny_model_dir: Path, tiny_lm_dir: Path) -> None:
    """A classification file, an encoder model, or cuda on a machine without one: one line, nothing written."""
    import torch

    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"prompt": "q", "response": "a"}\n' * 20)
    cases = [
        (["--task", "causal-lm", "--data", str(chat)], "task causal-lm needs --model"),
        (["--task", "causal-lm", "--model", str(tiny_lm_dir), "--data", str(small_data)],
         "needs a messages column, or prompt and response columns; columns: text, label"),
        (["--task", "causal-lm", "--model", str(tiny_model_dir), "--data", str(chat), "--clients", "2"],
         "is an encoder (bert), not a decoder LM"),
        (["--task", "causal-lm", "--model", str(tiny_lm_dir), "--data", str(chat), "--dp", "--head-lr", "0.1"],
         "head_lr is a seq-cls setting"),
        (["--gradient-checkpointing", "maybe"], "expected true or false, got 'maybe'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", "--data", str(small_data)], "device cuda: torch sees no CUDA GPU"))
        cases.append((["--client-gpus", "0.5", "--data", str(small_data)], "client_gpus 0.5: torch sees no CUDA GPU"))
    for args, expected in cases:
        if args[0] == "--gradient-checkpointing":
            with pytest.raises(SystemExit):
                run_cli(capsys, *args, "--out", str(tmp_path / "run"))
            assert expected in capsys.readouterr().err
            continue
        code, err = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
        assert code == 2 and err.count("\n") == 1 and expected in err, (args, err)
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_flag_and_dp_preset_for_causal_lm() -> None:
    from fedpeft.cli.main import build_parser, with_defaults

    parse = build_parser().parse_args
    assert parse(["simulate", "--gradient-checkpointing"]).gradient_checkpointing is True
    assert parse(["simulate", "--gradient-checkpointing", "false"]).gradient_checkpointing is False
    dp = with_defaults({"task": "causal-lm", "dp": "local"})
    assert "head_lr" not in dp and dp["strategy"] == "ffa-lora"  # no head in a causal LM


def test_simulation_gives_each_client_its_gpu_share(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    small_data: Path) -> None:
    """``--client-gpus`` becomes Flower's client-resources ``num_gpus`` (Ray schedules clients by it)."""
    import flwr.simulation

    from fedpeft.config import FedPeftConfig
    from fedpeft.state_dir import STATE_DIR_ENV
    from server.simulate import simulate

    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "sites"))  # simulate sets it when absent
    seen = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: seen.update(kw["backend_config"]))
    simulate(FedPeftConfig(data=str(small_data), client_gpus=0.25, client_cpus=1, out=str(tmp_path / "r")))
    assert seen["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}
