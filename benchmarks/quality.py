"""Quality of each weight format of a model: perplexity over a text (sliding window) and greedy
agreement with the bf16 model over picochat's built-in prompt set.

    python benchmarks/quality.py            # the default model and the shipped text; last line JSON

Rows: fp32 and bf16 (the checkpoint's weights; for a GGUF, its blocks dequantized), int8, int4 as
loaded (a GGUF's Q4_0/Q4_1 blocks used directly), and int4 re-quantized by picochat from the float
weights in the model's dtype (what a float checkpoint or a live switch gets) for each group size.
The quantized rows run in --quant-dtype (bf16 by default, like the reference row). Agreement:
"per position" compares bf16's greedy reply token by token with the row's argmax given the same
prefix; "prefix" is the mean share of the reply the row would generate identically.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from picochat.config import QuantConfig
from picochat.errors import ConfigError
from picochat.engine.engine import DTYPES
from picochat.evaluate import greedy_agreement, perplexity, read_text
from picochat.model.build import build_transformer
from picochat.model.quantize import build_quantized_linears, swap_linears
from picochat.model.registry import DEFAULT_MODEL, resolve_model


@dataclass(frozen=True)
class Row:
    name: str
    dtype: str
    quant: QuantConfig
    requantize: bool = False  # quantize the float model's linears instead of building in ``quant``


def rows(quant_dtype: str) -> list[Row]:
    return [
        Row("fp32", "float32", QuantConfig()),
        Row("bf16", "bfloat16", QuantConfig()),
        Row("int8", quant_dtype, QuantConfig("int8")),
        Row("int4 as loaded (g32)", quant_dtype, QuantConfig("int4", 32)),
        *(Row(f"int4 re-quantized g{g}", quant_dtype, QuantConfig("int4", g), requantize=True) for g in (32, 64, 128)),
    ]


def build(path: Path, row: Row, device: torch.device):
    model, tokenizer = build_transformer(path, DTYPES[row.dtype], QuantConfig() if row.requantize else row.quant,
                                         device)
    if row.requantize:
        swap_linears(model, build_quantized_linears(model, row.quant))
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="card name, GGUF file or HF folder")
    parser.add_argument("--text", type=Path, default=None, help="UTF-8 text (default: the shipped sample)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy reply length for agreement")
    parser.add_argument("--quant-dtype", default="bfloat16", choices=sorted(DTYPES))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model(args.model).path
    text = read_text(args.text)
    reference, tokenizer = build(path, Row("bf16", "bfloat16", QuantConfig()), device)
    token_ids = tokenizer.encode(text)
    bf16_ppl = perplexity(reference, token_ids, window=args.window, stride=args.stride)
    print(f"{path.name}: {len(token_ids)} tokens, window {args.window}, stride {args.stride}, device {device}")
    print(f"{'weights':<24} {'dtype':<9} {'perplexity':>10} {'vs bf16':>8} {'agree/pos':>9} {'prefix':>7}", flush=True)
    results = []
    for row in rows(args.quant_dtype):
        try:
            model = reference if row.name == "bf16" else build(path, row, device)[0]
        except ConfigError as e:  # e.g. a group size that does not divide the model's widths
            print(f"{row.name:<24} skipped: {e}", flush=True)
            continue
        ppl = bf16_ppl if model is reference else perplexity(model, token_ids, window=args.window, stride=args.stride)
        agreement = greedy_agreement(reference, model, tokenizer, max_tokens=args.max_tokens)
        print(f"{row.name:<24} {row.dtype:<9} {ppl:>10.4f} {ppl / bf16_ppl:>8.4f} "
              f"{agreement.per_position:>9.3f} {agreement.until_divergence:>7.3f}", flush=True)
        results.append({"weights": row.name, "dtype": row.dtype, "quant": row.quant.mode,
                        "group": row.quant.group_size if row.quant.mode == "int4" else None,
                        "perplexity": ppl, "agreement_per_position": agreement.per_position,
                        "agreement_prefix": agreement.until_divergence, "positions": agreement.positions})
        del model
    print(json.dumps({"model": path.name, "tokens": len(token_ids), "window": args.window, "stride": args.stride,
                      "device": str(device), "rows": results}))


if __name__ == "__main__":
    main()
