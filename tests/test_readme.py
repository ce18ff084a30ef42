"""The README documents every setting and starts with the two commands."""

from pathlib import Path

from colo.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented():
    for var, default, description in Config.field_docs():
        assert f"| `{var}` | `{default}` | {description} |" in README, var


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
