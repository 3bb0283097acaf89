"""``lopa gateway``: trained tasks served by name to any OpenAI client, on the user's side of the wall.

The gateway loads each task's artifact (generator, encoder, recorded prompt format), computes every
request's soft prompt (batched per task across concurrent requests) and forwards the request, soft
prompt added, to a ``lopa serve`` upstream, which holds the one frozen model and no per-task state.
Like :class:`lopa.client.Client`, it may load generators; the server never does.

Rooms: ``config`` (:class:`GatewayConfig`, the command line), ``registry`` (the loaded tasks and their
check against the upstream), ``batching`` (soft prompts computed in batches), ``upstream`` (HTTP to
the server and its errors), ``metrics``, ``app`` (the routes) and ``server`` (``lopa gateway``).

>>> GatewayConfig.__dataclass_fields__["upstream"].default
'http://127.0.0.1:8000'
"""

from .config import GatewayConfig

__all__ = ["GatewayConfig"]
