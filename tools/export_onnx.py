#!/usr/bin/env python
"""Export a trained backbone (`model.pt`) to ONNX.

    python tools/export_onnx.py work_dirs/ms1mv3_r50/model.pt --network r50 [--output model.onnx]

The graph takes `data` [N, 3, 112, 112] RGB normalised as (x - 127.5) / 127.5
(batch dynamic) and returns the unnormalised embedding: what insightface's
`model_zoo.get_model` loads as its ArcFaceONNX recogniser.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("weights", help="model.pt / backbone.pth: a backbone state_dict")
    parser.add_argument("--network", required=True, help="backbone name, e.g. r50, mbf, vit_t")
    parser.add_argument("--embedding-size", type=int, default=None, help="default: read from the weights")
    parser.add_argument("--output", default=None, help="default: the weights' path with .onnx")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)

    import torch

    from backbones import available_models, get_model
    from eval.onnx_export import compare_with_onnxruntime, export_onnx

    weights = Path(args.weights)
    output = Path(args.output) if args.output else weights.with_suffix(".onnx")
    if args.network not in available_models():
        print(f"error: unknown network {args.network!r}; valid: {', '.join(available_models())}", file=sys.stderr)
        return 2
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        print(f"error: weights file not found: {weights}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: cannot read {weights}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if isinstance(state, dict) and "state_dict_backbone" in state:
        state = state["state_dict_backbone"]
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    num_features = args.embedding_size or _embedding_size(state)
    model = get_model(args.network, num_features=num_features)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[:2])[:300]
        print(f"error: {weights} does not fit network {args.network!r}: {first}", file=sys.stderr)
        return 2
    export_onnx(model, output, opset=args.opset)
    diff = compare_with_onnxruntime(model, output)
    print(f"wrote {output} (embedding size {num_features}; max |onnxruntime - pytorch| = {diff:.2e})")
    return 0


def _embedding_size(state: dict) -> int:
    """Every backbone ends with a BatchNorm1d over the embedding: its running_mean is the last one."""
    keys = [k for k in state if k.endswith("running_mean")]
    return int(state[keys[-1]].shape[0]) if keys else 512


if __name__ == "__main__":
    sys.exit(main())
