"""Protocol v1 (PROTOCOL.md): requests, event routing, dispatch."""
