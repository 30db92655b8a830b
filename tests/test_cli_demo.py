from click.testing import CliRunner

from ccq.cli import main


def test_demo_prints_quality_table():
    r = CliRunner().invoke(main, ["demo", "--size", "32", "--bits", "4"])
    assert r.exit_code == 0, r.output
    assert "| 4 |" in r.output and "Lloyd-Max" in r.output


def test_demo_rejects_bad_bits():
    r = CliRunner().invoke(main, ["demo", "--bits", "7"])
    assert r.exit_code != 0 and "Traceback" not in r.output
