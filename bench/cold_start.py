"""What a deployed site pays per round for an LLM-shaped model, without a site worker and with one.

    python bench/cold_start.py                          # Qwen2-0.5B's shape (494M parameters), CPU
    python bench/cold_start.py --shape tiny --repeats 1 # a quick check

Without a worker, Flower 1.39 starts a fresh process for every message, and fedpeft's ClientApp then
imports its stack, builds the base model + LoRA and reads and tokenizes the site's file, every round.
This script times exactly that in a fresh interpreter (``--repeats`` times, median; the model files are
in the page cache after the first, as they would be at a site that trained before): the imports
(``import client.local``: torch, transformers, peft, opacus, fedpeft), the model (the process's
:data:`client.sites.SITES` building its :class:`fedpeft.site.SiteModel`: ``from_pretrained`` of the
saved weights, LoRA on the attention and MLP projections, and the tokenizer) and the data
(``SITES.site`` for a node whose ``data-path`` is a ``--rows``-conversation file: the file read and
tokenized). Then, in the same process, the same two calls again: what the site worker pays in a round
after its first (the model and the encoded data are held). The worker takes its node's messages from the
SuperNode itself, so no process is started per message either (see ``bench/deployed.py``).

The model is randomly initialised from the architecture's config (nothing can be downloaded; the load
time depends on the shape and dtype, not on the values) and saved once to a temporary directory with a
word-level tokenizer over its vocabulary. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # AutoConfig.for_model keyword arguments
    "qwen2-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                                 tie_word_embeddings=True)),
    "tinyllama-1.1b": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                     max_position_embeddings=4096)),
    "tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)),
}

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import client.local  # what the per-message process imports: the ClientApp and its stack
from client.sites import SITES  # the sites this process serves (client.sites.site_for asks it)
from fedpeft.config import FedPeftConfig
t1 = time.perf_counter()
cfg = FedPeftConfig(task="causal-lm", model=sys.argv[1], data=sys.argv[2], max_length=int(sys.argv[3]),
                    client_cpus=int(sys.argv[4]))
node = {"data-path": sys.argv[2]}
SITES.model(cfg, num_labels=0)
t2 = time.perf_counter()
data = SITES.site(cfg, node, label_names=[]).data  # the model above is held: this reads and tokenizes the file
t3 = time.perf_counter()
SITES.model(cfg, num_labels=0)  # a round at a warm worker: both come from what the process holds
SITES.site(cfg, node, label_names=[])
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "model": t2 - t1, "data": t3 - t2, "warm": t4 - t3, "rows": len(data)}))
"""


def save_model(shape: str, directory: Path) -> int:
    """A random model of ``shape`` and a word-level tokenizer over its vocabulary; its parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    kind, kwargs = SHAPES[shape]
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kwargs))
    net.save_pretrained(str(directory))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(kwargs["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0").save_pretrained(str(directory))
    return sum(p.numel() for p in net.parameters())


def write_data(path: Path, rows: int, vocab: int) -> None:
    import random

    rng = random.Random(0)
    words = lambda n: " ".join(f"t{rng.randrange(2, vocab)}" for _ in range(n))  # noqa: E731
    path.write_text("".join(json.dumps({"prompt": words(40), "response": words(40)}) + "\n" for _ in range(rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1000, help="conversations in the site's file")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpeft-cold-"))
    try:
        started = time.perf_counter()
        params = save_model(args.shape, work / "model")
        saved = time.perf_counter() - started
        size = sum(f.stat().st_size for f in (work / "model").iterdir())
        write_data(work / "site.jsonl", args.rows, SHAPES[args.shape][1]["vocab_size"])
        runs = []
        for _ in range(args.repeats):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(work / "model"), str(work / "site.jsonl"),
                                   str(args.max_length), str(args.cpus)], cwd=ROOT, capture_output=True, text=True,
                                  env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}, timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"# {json.dumps(runs[-1])}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("imports", "model", "data", "warm")}
    cold = med["imports"] + med["model"] + med["data"]
    print(f"\n{args.shape}: {params / 1e6:.0f}M parameters, {size / 1e9:.2f} GB on disk (fp32; saved in "
          f"{saved:.0f} s), "
          f"{args.rows} conversations at max length {args.max_length}, {args.cpus} threads; median of {args.repeats} "
          "fresh processes\n")
    print("| per round, at a site that trained before | imports (s) | model + LoRA (s) | data (s) | total (s) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| no worker (a fresh process per message) | {med['imports']:.2f} | {med['model']:.2f} | "
          f"{med['data']:.2f} | {cold:.2f} |")
    print(f"| site worker (held since its first round) | 0 | — | — | {med['warm']:.4f} |")


if __name__ == "__main__":
    main()
