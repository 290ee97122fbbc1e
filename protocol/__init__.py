"""Wire protocol v1: topics, message schemas, update frames, manifests, transports.

Knows nothing of torch training or HTTP; tensors travel as numpy arrays.
"""

PROTOCOL_VERSION = 1
