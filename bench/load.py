"""Load: 100 simulated clients x 3 rounds on a tiny model, every client in every round.

    python bench/load.py                       # 100 clients, 3 rounds (a few minutes on 2 cores)
    python bench/load.py --clients 200 --rounds 2

Builds a 2-layer, 32-wide random BERT with the MiniLM tokenizer and a data file of 20 rows per client
(from the bundled corpus, repeated as needed), runs ``fedpeft simulate --fraction 1`` and checks that
every round aggregated every client. Prints wall time and seconds per client-round.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from simulation import simulate


def build(root: Path, rows: int) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from fedpeft.data import DEFAULT_DATA
    from fedpeft.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(""))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    corpus = DEFAULT_DATA.read_text(encoding="utf-8").splitlines()
    data = root / "data.jsonl"
    data.write_text("\n".join(corpus[i % len(corpus)] for i in range(rows)) + "\n")
    return root / "model", data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = build(root, rows=int(20 * args.clients / 0.9) + 1)
        records, seconds = simulate(root / "run", [
            "--model", str(model), "--data", str(data), "--clients", str(args.clients), "--rounds", str(args.rounds),
            "--fraction", "1", "--max-local-steps", "1", "--batch-size", "8", "--client-cpus", "1",
            "--round-timeout", "1800"])
        rounds = records[1:]
        complete = all(r["clients"] == args.clients for r in rounds) and len(rounds) == args.rounds
        result = {
            "clients": args.clients,
            "rounds": args.rounds,
            "complete": complete,
            "clients_per_round": [r["clients"] for r in rounds],
            "failures": sum(r.get("failures", 0) for r in rounds),
            "seconds": round(seconds, 1),
            "seconds_per_client_round": round(seconds / (args.clients * args.rounds), 3),
        }
        print(json.dumps(result))
        if not complete:
            raise SystemExit("not every round aggregated every client")


if __name__ == "__main__":
    main()
