"""Command-line tools of bdia_fx (installed as ``bdia_fx.tools``): ``bdia-inspect``."""

__all__: list[str] = []
