"""Segment an image through any Open Inference Protocol v2 server: ``ciss serve`` or Triton.

usage: python oip_client.py --url localhost:8000 --model ciss IMAGE OUT.png
       (Triton serving the exported repository: --model ciss_onnx)

Uses the stock Triton HTTP client (pip install 'tritonclient[http]'); the image travels as a
binary UINT8 [1,3,H,W] tensor and the label mask comes back as binary UINT8 [1,H,W].
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.http as httpclient
from PIL import Image, ImageOps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="localhost:8000")
    ap.add_argument("--model", default="ciss")
    ap.add_argument("--version", default="", help="e.g. 3 (= step 2); default: server's choice")
    ap.add_argument("image")
    ap.add_argument("out")
    args = ap.parse_args()

    client = httpclient.InferenceServerClient(args.url)
    if not client.is_model_ready(args.model, args.version):
        raise SystemExit(f"{args.model} (version {args.version or 'default'}) is not ready")
    meta = client.get_model_metadata(args.model, args.version)
    image = np.asarray(ImageOps.exif_transpose(Image.open(args.image)).convert("RGB"))
    batch = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
    inp = httpclient.InferInput("image", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch, binary_data=True)
    res = client.infer(args.model, [inp], model_version=args.version,
                       outputs=[httpclient.InferRequestedOutput("labels", binary_data=True)])
    labels = res.as_numpy("labels")[0]
    Image.fromarray(labels, mode="L").save(args.out)
    served = res.get_response().get("model_version", "?")
    print(f"{args.out}: {labels.shape[1]}x{labels.shape[0]} mask from {args.model} version "
          f"{served} (versions {meta['versions']}); classes present: "
          f"{sorted(int(c) for c in np.unique(labels))}")


if __name__ == "__main__":
    main()
