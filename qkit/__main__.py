"""``python -m qkit ...`` is ``qkit ...`` (docs/semantics.md#interfaces)."""
from qkit.cli import entry_point

if __name__ == "__main__":
    entry_point()
