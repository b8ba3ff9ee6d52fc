"""A fedpeft client-round's training throughput ÷ a bare peft + torch loop's: same device, model, batch.

    python bench/gpu_client.py                       # on a GPU: Qwen2-0.5B-shaped Llama-family model, bf16
    python bench/gpu_client.py --shape tiny --steps 6   # a CPU check that the script runs (numbers mean little)

Both sides train the same random-init decoder LM (no weights can be downloaded: the architecture is
real, the weights are not; throughput does not depend on them) with LoRA r=16 on the attention and MLP
projections, on the same fixed-length token batches, with bf16 autocast when the device supports it.

* **fedpeft**: what the ClientApp does in a round, minus Flower's messaging: set the adapter from the
  broadcast (``load_adapter_state``), ``fedpeft.client_round.train_client_round`` (the task, runtime, seeds
  and optimizer the config names), and the reply's ``adapter_state`` (fp32 numpy arrays), on the model a
  site holds (:class:`fedpeft.site.SiteModel`).
* **bare**: ``peft.get_peft_model`` on the same model and an AdamW loop calling ``model(**batch).loss``.
* **DP** (``--dp``, on by default): fedpeft's ``privacy.dpsgd.dp_train_local`` (Poisson sampling,
  per-conversation clipping, noise, accounting) against a bare Opacus ``make_private`` loop with the
  same clipping mode, noise, sampling rate and per-sequence loss.

Runs alternate (fedpeft, bare) ``--repeats`` times after a warm-up; each ratio is the median of the
per-repeat tokens/s ratios. Target: ≥ 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# bench/strategies.py would shadow the `strategies` package: this folder leaves the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedpeft.adapters import adapter_state, load_adapter_state  # noqa: E402
from fedpeft.client_round import runtime, train_client_round, train_settings  # noqa: E402
from fedpeft.config import FedPeftConfig  # noqa: E402
from fedpeft.site import SiteModel  # noqa: E402
from fedpeft.tasks.causal_lm import sequence_losses  # noqa: E402
from fedpeft.training import Encoded  # noqa: E402

SHAPES = {  # transformers LlamaConfig / Qwen2Config keyword arguments
    # Qwen2-0.5B's shape (494M parameters)
    "qwen2-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                                 tie_word_embeddings=True)),
    # TinyLlama-1.1B's shape
    "llama-1.1b": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)),
    "tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_model(shape: str, directory: Path) -> int:
    """Save a random model of ``shape`` with a minimal tokenizer; return its parameter count."""
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    kind, kwargs = SHAPES[shape]
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **kwargs)
    net = AutoModelForCausalLM.from_config(config)
    net.save_pretrained(str(directory))
    vocab = {f"t{i}": i for i in range(kwargs["vocab_size"])}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   eos_token="t1", pad_token="t0")
    fast.save_pretrained(str(directory))
    return sum(p.numel() for p in net.parameters())


def token_data(n: int, seq: int, vocab: int, seed: int = 0) -> Encoded:
    """``n`` fixed-length random sequences, the second half of each labelled (a response)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(n, seq)).tolist()
    labels = [[-100] * (seq // 2) + row[seq // 2:] for row in ids]
    return Encoded(input_ids=ids, labels=labels, pad_id=0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fedpeft_round(cfg: FedPeftConfig, model, state, data: Encoded, *, dp: tuple | None) -> tuple[float, int]:
    """Seconds and tokens of one client-round the way client/local.py runs it."""
    from privacy.dpsgd import DPSGD, dp_train_local

    where = runtime(cfg)
    sync(where.device)
    start = time.perf_counter()
    load_adapter_state(model, state)
    if dp is None:
        result = train_client_round(cfg, model, data, server_round=1, partition_id=0)
        seen = result["examples_seen"]
    else:
        sigma, clip, mode = dp
        result, _ = dp_train_local(model, data, dp=DPSGD(sigma, clip, mode), generator_seed=1,
                                   **train_settings(cfg))
        seen = result["examples_seen"]
    adapter_state(model)
    sync(where.device)
    return time.perf_counter() - start, seen * len(data.input_ids[0])


def bare_model(directory: Path, cfg: FedPeftConfig):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    where = runtime(cfg)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(str(directory), dtype=where.dtype)
    net.config.use_cache = False
    model = get_peft_model(net, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                           target_modules=TARGETS))
    return model.to(where.device)


def bare_round(cfg: FedPeftConfig, model, data: Encoded, *, dp: tuple | None) -> tuple[float, int]:
    """Seconds and tokens of the same number of steps in a plain peft + torch (+ Opacus) loop."""
    where = runtime(cfg)
    ids = torch.tensor(data.input_ids)
    labels = torch.tensor(data.labels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    model.train()
    sync(where.device)
    start = time.perf_counter()
    tokens = 0
    if dp is None:
        for step in range(cfg.max_local_steps):
            rows = slice(step * cfg.batch_size % len(ids), step * cfg.batch_size % len(ids) + cfg.batch_size)
            batch = {"input_ids": ids[rows].to(where.device), "labels": labels[rows].to(where.device)}
            with where.autocast_context():
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += batch["input_ids"].numel()
    else:
        from opacus import PrivacyEngine

        sigma, clip, mode = dp
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=cfg.batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = PrivacyEngine(accountant="prv").make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
                criterion=torch.nn.CrossEntropyLoss(), poisson_sampling=True, grad_sample_mode=mode,
                wrap_model=False)
        if mode == "ghost":
            hooks, dp_opt, criterion, dp_loader = made
        else:
            (hooks, dp_opt, dp_loader), criterion = made, None
        steps = 0
        while steps < cfg.max_local_steps:
            for x, y in dp_loader:
                if len(x) == 0:
                    continue
                x, y = x.to(where.device), y.to(where.device)
                with where.autocast_context():
                    logits = model(input_ids=x).logits
                if mode == "ghost":
                    flat = logits[:, :-1].float()
                    loss = criterion(flat.reshape(-1, flat.shape[-1]), y[:, 1:].reshape(-1), shape=flat.shape)
                else:
                    loss = sequence_losses(logits, y).mean()
                loss.backward()
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
                tokens += x.numel()
                steps += 1
                if steps >= cfg.max_local_steps:
                    break
        hooks.cleanup()
    sync(where.device)
    model.eval()
    return time.perf_counter() - start, tokens


def measure(cfg: FedPeftConfig, model, directory: Path, data: Encoded, *, dp: tuple | None, repeats: int) -> dict:
    state = adapter_state(model)
    bare = bare_model(directory, cfg)
    fedpeft_round(cfg, model, state, data, dp=dp)  # warm-up: kernels, allocator, Opacus import
    bare_round(cfg, bare, data, dp=dp)
    ratios, ours, theirs = [], [], []
    for _ in range(repeats):
        t1, n1 = fedpeft_round(cfg, model, state, data, dp=dp)
        t2, n2 = bare_round(cfg, bare, data, dp=dp)
        ours.append(n1 / t1)
        theirs.append(n2 / t2)
        ratios.append(ours[-1] / theirs[-1])
    del bare
    return {"fedpeft_tokens_per_s": statistics.median(ours), "bare_tokens_per_s": statistics.median(theirs),
            "ratio": statistics.median(ratios), "ratios": [round(r, 4) for r in ratios]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--no-dp", action="store_true", help="skip the DP comparison")
    parser.add_argument("--dp-clipping", default="ghost", choices=["hooks", "ghost"])
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Opacus's and transformers' advice, printed every step

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        params = save_model(args.shape, directory)
        data_file = Path(tmp) / "unused.jsonl"  # the bench feeds tokens directly; the config needs a data path
        data_file.write_text('{"prompt": "q", "response": "a"}\n')
        cfg = FedPeftConfig(task="causal-lm", model=str(directory), data=str(data_file), lora_r=args.lora_r,
                            lora_alpha=2.0 * args.lora_r, lora_target_modules=",".join(TARGETS),
                            batch_size=args.batch_size, max_local_steps=args.steps, local_epochs=100, lr=1e-4,
                            device=args.device, precision=args.precision)
        where = runtime(cfg)
        name = torch.cuda.get_device_name() if where.device == "cuda" else "CPU"
        vocab = SHAPES[args.shape][1]["vocab_size"]
        data = token_data(args.batch_size * args.steps, args.seq, vocab)
        print(f"{args.shape}: {params / 1e6:.0f}M parameters on {name}, {where.autocast or 'fp32'}, "
              f"LoRA r={args.lora_r} on {len(TARGETS)} projections; batch {args.batch_size} x {args.seq} tokens, "
              f"{args.steps} steps, torch {torch.__version__}")
        results = {"shape": args.shape, "parameters": params, "device": name, "precision": where.autocast or "fp32",
                   "batch_size": args.batch_size, "seq": args.seq, "steps": args.steps}
        model = SiteModel(cfg, 0).model  # one for both comparisons, as a site holds it between rounds
        results["plain"] = measure(cfg, model, directory, data, dp=None, repeats=args.repeats)
        print("plain   fedpeft {fedpeft_tokens_per_s:10.0f} tok/s   bare peft+torch {bare_tokens_per_s:10.0f} tok/s"
              "   ratio {ratio:.3f}  {ratios}".format(**results["plain"]))
        if not args.no_dp:
            dp = (1.0, 1.0, args.dp_clipping)
            results["dp"] = measure(cfg, model, directory, data, dp=dp, repeats=args.repeats)
            print(f"DP {args.dp_clipping:5s} fedpeft {{fedpeft_tokens_per_s:10.0f}} tok/s   bare opacus "
                  "{bare_tokens_per_s:10.0f} tok/s   ratio {ratio:.3f}  {ratios}".format(**results["dp"]))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
