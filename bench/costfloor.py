"""
B4, the cost floor on this machine: what the unavoidable operations of a
key server and a notary cost, measured in-process with :mod:`timeit`.

- ed25519 sign and verify (PyNaCl / libsodium) of a ``/server`` object's
  signable bytes;
- canonical JSON encoding of such an object, both with synkeys'
  :func:`synkeys.signing.canonical_json` and with the standard library's
  ``json.dumps`` (sorted keys, no whitespace) for scale;
- strict decoding of a 10-origin notary POST body
  (:func:`synkeys.query.parse_query_body`), which every POST pays.

Run alone with ``python bench/costfloor.py``; ``bench/run.py`` includes it.
"""

from __future__ import annotations

import json
import timeit
from typing import Callable, Dict

import nacl.signing

from synkeys.keyfile import generate_signing_key
from synkeys.keyserver import build_server_keys
from synkeys.query import parse_query_body
from synkeys.signing import canonical_json, signable_bytes


def _per_op_us(call: Callable[[], object], budget_s: float = 0.25) -> float:
    """The best of three timings of ``call``, in microseconds per call."""
    timer = timeit.Timer(call)
    count, elapsed_s = timer.autorange()
    runs = max(1, int(count * budget_s / max(elapsed_s, 1e-9)))
    best_s = min(timer.repeat(repeat=3, number=runs))
    return best_s / runs * 1e6


def measure() -> Dict[str, float]:
    """Microseconds per operation, by operation name."""
    key = generate_signing_key("a_bench")
    obj = build_server_keys("bench.example.org:8448", [key], [], 1_900_000_000_000, [b"\0" * 32])
    message = signable_bytes(obj)
    signature = key.key.sign(message).signature
    verify_key: nacl.signing.VerifyKey = key.key.verify_key
    body = json.dumps(
        {
            "server_keys": {
                f"origin{i}.example.org:8448": {
                    "ed25519:a": {"minimum_valid_until_ts": 1_700_000_000_000}
                }
                for i in range(10)
            }
        }
    ).encode()
    return {
        "ed25519_sign_us": _per_op_us(lambda: key.key.sign(message)),
        "ed25519_verify_us": _per_op_us(lambda: verify_key.verify(message, signature)),
        "canonical_json_us": _per_op_us(lambda: canonical_json(obj)),
        "json_dumps_sorted_us": _per_op_us(
            lambda: json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        ),
        "parse_post_10_origins_us": _per_op_us(lambda: parse_query_body(body)),
    }


def main() -> None:
    """Print the measurements."""
    for name, value in measure().items():
        print(f"{name:28s} {value:8.2f}")


if __name__ == "__main__":
    main()
