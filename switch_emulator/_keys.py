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

# Key files are read, and clients configured, exactly as the workers do: switchagg/_curve.py needs
# only zmq (no torch, nothing of the training side), so the switch shares it instead of a copy.
from switchagg._curve import client_options, load_key_file, load_public

__all__ = ["keygen", "server_options", "probe_options"]


def probe_options(sock: zmq.Socket, key_or_path: str) -> None:
    """Make the probe's socket a CURVE client of the switch (public key, z85 or its .key file)."""
    client_options(sock, load_public(key_or_path))


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
