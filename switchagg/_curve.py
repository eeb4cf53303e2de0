"""ZeroMQ CURVE, the worker's side: the option a cluster switches on so that only key holders
reach the switch (the switch's side is switch_emulator/_keys.py).

What it owns: reading the switch's public key (written by `switch-emulator keygen DIR`, pyzmq's
certificate format: DIR/switch.key holds the public key, DIR/switch.key_secret both), and setting
the CURVE client options. What it must never do: invent a key format, or log a secret.

How it works: the switch's ROUTER is a CURVE server with its secret key; every worker's DEALER is a
CURVE client that knows the switch's public key and makes itself a fresh key pair per connection.
Traffic is then encrypted and authenticated (a peer without the public key cannot complete the
handshake; ZeroMQ drops it before any frame reaches the switch's loop). Workers are not
individually authorized: that is the switch's `--token`. CURVE costs CPU per byte (measure with
`switchagg bench` before turning it on for bulk runs); the loopback default keeps it off.
"""

from __future__ import annotations

import os

import zmq
import zmq.utils.z85

__all__ = ["load_key_file", "load_public", "client_options"]

_Z85_KEY_LEN = 40


def _need_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support (build pyzmq against libsodium)")


def load_key_file(path: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret or None) z85 keys from a pyzmq certificate file.

    Raises:
        ValueError: the file is missing or unreadable, or (want_secret) holds no secret key.
    """
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a CURVE key from {path!r}: {exc}; write one with "
                         "`switch-emulator keygen DIR`") from None
    if want_secret and not secret:
        raise ValueError(f"{path!r} holds no secret key; pass the .key_secret file")
    return public, secret


def load_public(key_or_path: str) -> bytes:
    """The switch's public key: a 40-character z85 string, or a path to its `.key` file.

    Raises:
        ValueError: neither a key nor a readable key file.
    """
    if len(key_or_path) == _Z85_KEY_LEN and not os.path.exists(key_or_path):
        try:
            zmq.utils.z85.decode(key_or_path)
        except (ValueError, KeyError):
            raise ValueError("the switch key is 40 characters but not z85") from None
        return key_or_path.encode()
    return load_key_file(key_or_path, want_secret=False)[0]


def client_options(sock: zmq.Socket, server_public: bytes) -> None:
    """Make `sock` a CURVE client of the switch whose public key is `server_public`."""
    _need_curve()
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret
