"""The task lifecycle, split by concern; it knows no protocol (frontends supply the messages)."""
