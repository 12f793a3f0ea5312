"""Operations around the lifecycle: retention and GC (gc.py)."""
