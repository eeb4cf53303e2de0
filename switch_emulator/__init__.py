"""The emulated programmable switch: dataplane (slot pool), control plane, ZeroMQ front.

It imports only `switchagg.packet`, `switchagg.protocol` and `switchagg.errors` from the library
(never training code or torch), numpy and pyzmq.
"""
