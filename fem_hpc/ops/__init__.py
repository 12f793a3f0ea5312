"""Operations around the lifecycle: the health report and doctor, status, retention (gc, caches)."""
