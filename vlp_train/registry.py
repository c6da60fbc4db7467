"""Things registered by name: model families (`model.arch`, families/) and fine-tuning tasks
(`task.name`, finetune/tasks.py). The one rule of both: a name registers once, and an unknown
name is refused naming the choices."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """name -> item (its `.name`), a dict; `register` adds an item, `of` looks one up."""

    def __init__(self, kind: str, key: str):
        super().__init__()
        self.kind, self.key = kind, key  # what its errors name: "model family", the config key "model.arch"

    def register(self, item: T) -> T:
        if item.name in self:
            raise ValueError(f"{self.kind} {item.name!r} registered twice")
        self[item.name] = item
        return item

    def of(self, name: str) -> T:
        if name not in self:
            raise ValueError(f"{self.key}={name!r}: unknown {self.kind} (choose from {sorted(self)})")
        return self[name]
