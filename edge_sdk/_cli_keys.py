"""``edge-sdk keys generate`` and ``edge-sdk sign``: ed25519 keys, and signing an existing package.

Thin glue over ``runtime.signing``; both need the ``cryptography`` package (the 'convert' extra on
the workstation), and without it only these subcommands fail, naming the extra.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from runtime.signing import generate_key_pair

    key, pub, key_id = generate_key_pair(args.out, args.name)
    if args.json:
        print(json.dumps({"key_id": key_id, "private_key": str(key), "public_key": str(pub)}, indent=2))
        return 0
    print(f"key id: {key_id}")
    print(f"private key: {key} (mode 600: keep it on the signing machine; sign with --sign {key})")
    print(f"public key: {pub} (copy it to the devices and list it in the daemon's [trust] keys)")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from runtime.package import sign_package

    key_id = sign_package(args.package, args.key, replace=args.replace)
    print(f"signed {args.package} with key {key_id}")
    return 0


def add_keys_parser(sub: Any) -> None:
    """Register ``edge-sdk keys generate`` and ``edge-sdk sign`` on the top-level subparsers."""
    p = sub.add_parser("keys", help="ed25519 signing keys for packages")
    keys = p.add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("generate", help="write a new key pair: NAME.key (private, mode 600) and NAME.pub")
    p.add_argument("--out", required=True, help="directory to write the key files into")
    p.add_argument("--name", default="edge-sdk", help="file name of the pair (default edge-sdk)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_keys_generate)

    p = sub.add_parser("sign", help="sign an existing package (directory or archive) in place")
    p.add_argument("package")
    p.add_argument("--key", required=True, help="the private key file (NAME.key)")
    p.add_argument("--replace", action="store_true",
                   help="drop every earlier signature instead of keeping other keys' valid ones")
    p.set_defaults(func=_cmd_sign)
