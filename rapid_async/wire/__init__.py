"""What crosses the network: the wire format, the ZeroMQ sockets and CURVE keys.

Modules:
    protocol.py   every message type and its encoding (the only module that
                  knows the wire format)
    transport.py  the learner's and the actor's ZeroMQ sockets (import them from here):
                  learner_sockets.py (bound, learner), actor_sockets.py
                  (connected, actors), receive.py (BadMessage)
    security.py   the loopback rule and CURVE keys
"""
