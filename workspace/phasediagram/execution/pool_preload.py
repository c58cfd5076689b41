"""What the worker pool's fork server imports once, before it forks any worker (`local_pool.start_pool`).

Every pool worker is a fork of that server, so it starts with these imports done: torch and this
package (`local_pool` and the jobs under it), and torch._dynamo, which torch.optim imports when a process builds its first
optimizer. The server runs no torch operation, so it has no threads to lose in a
fork. What it imported is then frozen (`runtime.freeze_alive`): no garbage collection walks those
objects, neither in the workers nor in the server, whose exit would otherwise walk them all.
"""

import torch._dynamo  # noqa: F401

from phasediagram.execution import local_pool  # noqa: F401
from phasediagram.execution.runtime import freeze_alive

freeze_alive()
