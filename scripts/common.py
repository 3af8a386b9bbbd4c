"""What every command line shares: quiet third-party logs, and config errors as exit code 2."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    """Our logs at `level`; absl/orbax chatter only at WARNING and above."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def fail(message: str, code: int = 2) -> None:
    """Print `message` as a command-line error and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
