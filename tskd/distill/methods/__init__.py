"""Built-in methods; importing this package registers them all."""

from tskd.distill.methods import at, crd, dkd, fitnet, kd, reviewkd, vanilla  # noqa: F401
from tskd.distill.tskd import distiller as _tskd  # noqa: F401  (registers "tskd")
