"""The console entry (`dist-cnn`, `python -m dist_cnn.cli`): the commands live in dist_cnn.commands."""

from dist_cnn.commands import entry, main  # noqa: F401

if __name__ == "__main__":
    entry()
