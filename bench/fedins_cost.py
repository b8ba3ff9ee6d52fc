"""What FedIns costs beside plain SSF on the bundled MiniLM: the upload (adapter bytes a site sends a round)
and CPU inference time, measured side by side in one process.

    python bench/fedins_cost.py                       # M 4, N 1 over every layer, and over the LayerNorms only
    python bench/fedins_cost.py --pool 25 --select 3  # the official code's M and N

Inference: the same test texts, tokenized once, classified in batches of ``--batch-size`` by (a) SSF folded
into the weights (what ``fedpeft export`` ships for SSF: no extra cost over the base model), (b) SSF unfolded
(the training model), (c) FedIns (the query pass with the pool off, top-N by cosine, the forward with each
input's SSF). The models take turns within each of ``--repeats`` rounds; the median time is reported, and
the ratio FedIns ÷ SSF for both SSF forms. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=4, help="M")
    parser.add_argument("--select", type=int, default=1, help="N")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from fedpeft.adapters import adapter_state, apply_peft
    from fedpeft.config import FedPeftConfig
    from fedpeft.data.sources import load_split
    from fedpeft.models import load_model

    torch.set_num_threads(args.threads)
    _, test = load_split(FedPeftConfig())
    texts = list(test.texts)[: args.texts]
    models, sizes = {}, {}
    variants = {
        "ssf": FedPeftConfig(peft="ssf"),
        "fedins": FedPeftConfig(peft="ssf-pool", ssf_pool_size=args.pool, ssf_pool_select=args.select),
        "fedins-ln": FedPeftConfig(peft="ssf-pool", ssf_pool_size=args.pool, ssf_pool_select=args.select,
                                   ssf_target_modules="LayerNorm"),
    }
    tokenizer = None
    for name, cfg in variants.items():
        torch.manual_seed(0)
        base, tokenizer = load_model("", num_labels=2, pooling="auto")
        wrapped = apply_peft(base, cfg).eval()
        sizes[name] = sum(v.nbytes for v in adapter_state(wrapped).values())
        with torch.no_grad():  # trained-looking values: γ, β away from the identity, keys spread
            for p in wrapped.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        models[name] = wrapped
    folded_base, _ = load_model("", num_labels=2, pooling="auto")
    models["ssf-folded"] = apply_peft(folded_base, variants["ssf"]).merge_and_unload().eval()
    batches = [tokenizer(texts[i:i + args.batch_size], padding=True, truncation=True, max_length=128,
                         return_tensors="pt") for i in range(0, len(texts), args.batch_size)]
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(**batches[0])
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                for batch in batches:
                    model(**batch)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "texts": len(texts), "batch_size": args.batch_size, "pool": args.pool, "select": args.select,
        "upload_bytes": sizes,
        "upload_ratio": {name: round(sizes[name] / sizes["ssf"], 3) for name in ("fedins", "fedins-ln")},
        "seconds": {name: round(t, 3) for name, t in median.items()},
        "inference_ratio_vs_ssf_unfolded": {n: round(median[n] / median["ssf"], 3) for n in ("fedins", "fedins-ln")},
        "inference_ratio_vs_ssf_folded": {n: round(median[n] / median["ssf-folded"], 3)
                                          for n in ("fedins", "fedins-ln")},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
