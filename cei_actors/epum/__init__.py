"""The EPU Management Service: elastic domains of VMs run by pluggable decision engines.

- ``logic.EPUM``: the pure event-sourced core (domains, decider, doctor, reaper).
- ``messages``: what EPUM receives, and ``NodeState`` which it sends to subscribers.
- ``engines``: the engine API (``base``) and preserve_n, needy, sensor, overflow.
- ``health``: pure health rules; ``sensors``: metric sources.
- ``actor.EPUMActor``: the thespian shell; ``client.EPUMClient``: typed calls.
"""
