"""`python -m invarlock` is the same program as the `invarlock` console script."""

from invarlock.cli import main

if __name__ == "__main__":
    main()
