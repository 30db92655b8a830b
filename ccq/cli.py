"""The `ccq` command: a thin click layer over the Python API."""

from __future__ import annotations

import sys

import click


class CcqError(click.ClickException):
    """A user-facing failure: one line on stderr, exit code 1, no traceback."""

    def show(self, file=None):
        click.echo(f"ccq: error: {self.format_message()}", err=True, file=file)


def run_guarded(fn, *args, **kwargs):
    """Call fn, turning expected failures (bad files, bad values) into a one-line CcqError."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError, KeyError) as e:
        msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
        raise CcqError(msg.splitlines()[0] if msg else type(e).__name__) from None


@click.group()
@click.version_option(package_name="ccq")
def main():
    """ccq: trellis-coded 2/3/4-bit compression of MoE expert weights."""


@main.command()
@click.option("--bits", "bits", multiple=True, type=click.IntRange(2, 4), default=(2, 3, 4), show_default=True,
              help="Bit widths to run (repeatable).")
@click.option("--size", default=256, show_default=True, type=click.IntRange(16, 8192),
              help="The sample matrix is SIZE x SIZE i.i.d. N(0,1).")
@click.option("--seed", default=0, show_default=True)
def demo(bits, size, seed):
    """Quantize a built-in Gaussian sample matrix and print the quality table."""
    from .codec.quality import format_table, gaussian_quality

    rows = [run_guarded(gaussian_quality, b, size, size, seed) for b in bits]
    click.echo(format_table(rows))


if __name__ == "__main__":
    sys.exit(main())
