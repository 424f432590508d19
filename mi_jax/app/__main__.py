"""`python -m mi_jax.app [CHECKPOINT]`: serves the page (as `mi-jax app`)."""

import sys

from mi_jax.app.server import serve

if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve(*sys.argv[1:2]))
