"""Verdict sources. One module per engine type; ``base.registry`` maps type names to classes."""

from .base import Engine, EngineContext, build_engine, registry

__all__ = ["Engine", "EngineContext", "build_engine", "registry"]
