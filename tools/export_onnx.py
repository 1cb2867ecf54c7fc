#!/usr/bin/env python
"""Export a trained backbone (`model.pt`) to ONNX.

    python tools/export_onnx.py work_dirs/ms1mv3_r50/model.pt --network r50 [--output model.onnx]

The graph takes `data` [N, 3, 112, 112] RGB normalised as (x - 127.5) / 127.5
(batch dynamic) and returns the unnormalised embedding: what insightface's
`model_zoo.get_model` loads as its ArcFaceONNX recogniser.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _cli import run_main  # first: puts the repository on sys.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("weights", help="model.pt / backbone.pth: a backbone state_dict")
    parser.add_argument("--network", required=True, help="backbone name, e.g. r50, mbf, vit_t")
    parser.add_argument("--embedding-size", type=int, default=None, help="default: read from the weights")
    parser.add_argument("--output", default=None, help="default: the weights' path with .onnx")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)

    # Imported after parsing, so that --help and a bad command line answer at once.
    from backbones.weights import embedding_size_of, load_backbone_weights
    from eval.onnx_export import compare_with_onnxruntime, export_onnx

    weights = Path(args.weights)
    output = Path(args.output) if args.output else weights.with_suffix(".onnx")
    model = load_backbone_weights(weights, args.network, embedding_size=args.embedding_size)
    export_onnx(model, output, opset=args.opset)
    diff = compare_with_onnxruntime(model, output)
    print(f"wrote {output} (embedding size {embedding_size_of(model.state_dict())}; max |onnxruntime - pytorch| = {diff:.2e})")
    return 0


if __name__ == "__main__":
    run_main(main)
