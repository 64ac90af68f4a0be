"""Pure codecs: bytes in, numpy arrays and dataclasses out.  No sockets, no Redis, no zmq."""
