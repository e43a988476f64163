"""`python -m charlm ...` runs the command line (also what torchrun launches with -m)."""

from .cli import main

if __name__ == "__main__":
    main()
