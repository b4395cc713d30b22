"""The request plane: one request frame in, a stream of reply frames out, over persistent TCP
connections (framing.py: length-prefixed msgpack; server.py: worker side; client.py: caller side).
Closing a connection mid-stream cancels the request on the worker."""
