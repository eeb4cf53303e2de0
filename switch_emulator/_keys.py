"""ZeroMQ CURVE, the switch's side: key generation (`switch-emulator keygen DIR`) and the server
options of its ROUTER (`--curve-secret-file`).

What it owns: writing a key pair in pyzmq's certificate format (DIR/switch.key, the public key to
hand to workers; DIR/switch.key_secret, mode 0600, which never leaves the switch's node) and making
the ROUTER a CURVE server with it. What it must never do: log or send the secret key. The workers'
side (switchagg/_curve.py) reads the same files; switchagg/_curve.py's essay says what CURVE
protects and what it costs.
"""

from __future__ import annotations

import os

import zmq

__all__ = ["keygen", "server_options", "probe_options"]


def load_key_file(path: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret or None) z85 keys of a pyzmq certificate file.

    The same reading as switchagg/_curve.py's: the switch imports nothing of the library but
    its wire modules.

    Raises:
        ValueError: the file is missing or unreadable, or (want_secret) has no secret key.
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


def probe_options(sock: zmq.Socket, key_or_path: str) -> None:
    """Make the probe's socket a CURVE client of the switch (public key, z85 or its .key file)."""
    public = (key_or_path.encode() if len(key_or_path) == 40 and not os.path.exists(key_or_path)
              else load_key_file(key_or_path, want_secret=False)[0])
    sock.curve_serverkey = public
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()


def keygen(directory: str, name: str = "switch") -> tuple[str, str]:
    """Write a new key pair into `directory`; returns (public file, secret file).

    Raises:
        RuntimeError: libzmq was built without CURVE.
        OSError: the directory cannot be written.
    """
    import zmq.auth

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support (pyzmq's wheels have it)")
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def server_options(sock: zmq.Socket, secret_file: str) -> bytes:
    """Make `sock` a CURVE server with the key pair in `secret_file`; returns the public key.

    Raises:
        ValueError: the file holds no usable secret key.
        RuntimeError: libzmq was built without CURVE.
    """
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support (pyzmq's wheels have it)")
    public, secret = load_key_file(secret_file, want_secret=True)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return public
