"""Logging setup: one format for every service, the service name in each line."""
import logging
import sys


def setup_logging(service: str, level: str = "info") -> logging.Logger:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format=f"%(asctime)s [{service}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    return logging.getLogger(f"radixserve.{service}")
