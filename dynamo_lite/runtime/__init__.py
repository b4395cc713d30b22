"""Component lifecycle: config (flag + environment twin), logging, signals, graceful shutdown."""
