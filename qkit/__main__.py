"""``python -m qkit ...`` is ``qkit ...`` (SPEC §12)."""
from qkit.cli import entry_point

if __name__ == "__main__":
    entry_point()
