"""A small Python client for the counterfactual API.

    from serving.client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as c:
        print(c.health(), c.model()["version"])
        out = c.counterfactuals("chest.png", [{"sex": "female"}, {"age": 80}],
                                parents={"sex": "male", "race": "white", "age": 61, "finding": "no_finding"})
        first = out["counterfactuals"][0]
        first["pixels"]            # numpy uint8 (H, W), decoded for you
        first["drift"]["finding"]  # change in the evaluation predictor's belief

The same call with curl (base64 -w0 is GNU; use `base64 -i chest.png` on macOS):

    curl -s http://127.0.0.1:8000/v1/counterfactuals \\
      -H 'Content-Type: application/json' -H "X-API-Key: $KEY" \\
      -d '{"image": "'"$(base64 -w0 chest.png)"'",
           "parents": {"sex": "male", "race": "white", "age": 61, "finding": "no_finding"},
           "interventions": [{"sex": "female"}], "t_u": 1.0, "seed": 0}' \\
      | python -c 'import sys, json, base64; r = json.load(sys.stdin); \\
                   open("cf.png", "wb").write(base64.b64decode(r["counterfactuals"][0]["image"]))'

Errors come back as {"detail": "...", "errors": [{"field", "message"}]}; the client raises
`ApiError` carrying the status code and that body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np

from cxrcf.png import decode_png, encode_png


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any):
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.body = status, body


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    def health(self) -> dict:
        return self._check(self._http.get("/healthz"))

    def model(self) -> dict:
        return self._check(self._http.get("/v1/model"))

    def counterfactuals(self, image: str | Path | np.ndarray | None, interventions: Sequence[Mapping[str, Any]],
                        parents: Mapping[str, Any] | None = None, t_u: float | None = None, seed: int = 0,
                        image_id: str | None = None) -> dict:
        """`image`: a PNG path or a uint8 (H, W) array (or None with `image_id`); `t_u` None: the
        server's serve.t_u. Adds `pixels` (numpy uint8) beside every base64 `image` of the reply."""
        body: dict[str, Any] = {"interventions": [dict(i) for i in interventions], "seed": seed}
        if t_u is not None:
            body["t_u"] = t_u
        if image is not None:
            body["image"] = _encode(image)
        if image_id is not None:
            body["image_id"] = image_id
        if parents is not None:
            body["parents"] = dict(parents)
        reply = self._check(self._http.post("/v1/counterfactuals", json=body))
        for cf in reply["counterfactuals"]:
            cf["pixels"] = decode_png(cf["image"])
        return reply


def _encode(image: str | Path | np.ndarray) -> str:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"image: expected a uint8 (H, W) array, got {image.dtype} {image.shape}")
        return encode_png(image)
    import base64

    return base64.b64encode(Path(image).read_bytes()).decode("ascii")
