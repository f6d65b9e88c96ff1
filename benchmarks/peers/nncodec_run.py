"""NNCodec (Fraunhofer HHI's MPEG NNC implementation) on plain state-dict checkpoints, as a peer.

Runs in its own virtualenv (NNCodec needs torchvision and pins its own stack; it is never an
mlcompress dependency), driven by ``benchmarks/quant_sweep.py --nncodec-python``:

    PYTHONPATH=benchmarks/peers/nnc_stub runs/nnc-venv/bin/python benchmarks/peers/nncodec_run.py \
        --out DIR --qp -26 -22 MODEL.pt ...

For every model and QP it writes the NNC bitstream, decodes it, saves the decoded state dict as
``DIR/<model stem>-qp<QP>.pt`` and prints one JSON line per result: model, qp, bitstream bytes,
decoded path. Settings are NNCodec's defaults for data-free coding (dependent quantization on,
DeepCABAC, parameter optimisation on, non-weight QP -75); only ``qp`` varies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--qp", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from nncodec.nnc import compression  # imported late: the peer venv only

    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        state = torch.load(model, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "model.pt"
            torch.save(OrderedDict((k, v.float()) for k, v in state.items()), plain)  # NNCodec wants an OrderedDict
            for qp in args.qp:
                stream = Path(tmp) / f"qp{qp}.nnc"
                devnull = open(os.devnull, "w")
                saved, sys.stdout = sys.stdout, devnull  # NNCodec prints its progress on stdout
                try:
                    compression.compress_model(str(plain), bitstream_path=str(stream), qp=qp, verbose=False)
                    params = compression.decompress(str(stream), verbose=False)
                finally:
                    sys.stdout = saved
                    devnull.close()
                out = args.out / f"{model.stem}-qp{qp}.pt"
                torch.save({k: torch.as_tensor(params[k]).reshape(state[k].shape).float() for k in state}, out)
                print(json.dumps({"model": str(model), "qp": qp, "bytes": stream.stat().st_size, "decoded": str(out)}),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
