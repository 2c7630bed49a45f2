"""``cupy.cuda.memory_hook``: hooks are per thread, as in CuPy; ``with hook:`` installs."""
import threading

_local = threading.local()


def _hooks() -> list:
    return list(getattr(_local, "hooks", {}).values())


class MemoryHook:
    """Subclass and override ``malloc_postprocess`` (and friends); ``name`` must be unique
    among the hooks installed in one thread."""

    name = "MemoryHook"

    def __enter__(self):
        hooks = _local.__dict__.setdefault("hooks", {})
        if self.name in hooks:
            raise KeyError(f"hook {self.name} already exists")
        hooks[self.name] = self
        return self

    def __exit__(self, *exc):
        del _local.hooks[self.name]

    def alloc_preprocess(self, **kwargs):
        pass

    def alloc_postprocess(self, **kwargs):
        pass

    def malloc_preprocess(self, **kwargs):
        pass

    def malloc_postprocess(self, **kwargs):
        pass

    def free_preprocess(self, **kwargs):
        pass

    def free_postprocess(self, **kwargs):
        pass
