"""The README and the guides say what is there: their code runs, the reference lists every public name, every
flag of the example is described by its --help."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_is_a_front_page_of_about_150_lines():
    assert len(README.read_text().splitlines()) <= 160


def test_every_python_block_of_the_readme_runs_as_written(tmp_path: Path, monkeypatch):
    blocks = python_blocks(README)
    assert blocks, "the README shows how to use the library"
    monkeypatch.chdir(tmp_path)  # whatever the blocks write stays in the test's directory
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code


@pytest.mark.parametrize("guide,least", [("after-training.md", 4), ("experiment-loggers.md", 1)])
def test_every_python_block_of_the_guides_with_code_runs_as_written(guide, least, tmp_path: Path, monkeypatch):
    blocks = python_blocks(ROOT / "docs" / guide)
    assert len(blocks) >= least, "a snippet for each tool the guide shows"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": guide}
    for block in blocks:
        exec(compile(block, guide, "exec"), namespace)  # noqa: S102 - the guide's own code


def test_the_queue_guide_s_loop_of_one_s_own_runs_as_written(tmp_path: Path, monkeypatch, capsys):
    # the guide's other blocks continue the README's run (model, optimizer, a checkpoint file); this one stands alone
    (block,) = [b for b in python_blocks(ROOT / "docs" / "queue-and-checkpoints.md") if "SwAVQueue(" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "queue-and-checkpoints.md", "exec"), {"__name__": "guide"})  # noqa: S102 - the guide's code
    assert capsys.readouterr().out.strip() == "torch.Size([2, 64, 16]) True"
    assert (tmp_path / "queue.pt").exists()


def test_the_api_reference_lists_every_public_name():
    import ignite_swav

    reference = (ROOT / "docs" / "api.rst").read_text()
    documented = set(re.findall(r"\.\. (?:auto(?:class|function)|py:data):: ignite_swav\.(\w+)", reference))
    public = {name for name in ignite_swav.__all__ if name != "__version__"}
    assert public - documented == set(), "missing from docs/api.rst"
    assert documented - public == set(), "documented but not public"


def test_the_guides_exist_and_the_index_lists_them():
    index = (ROOT / "docs" / "index.rst").read_text()
    guides = ("queue-and-checkpoints", "after-training", "troubleshooting", "distributed", "recipes", "augmentation")
    for guide in (*guides, "main-job", "internals"):
        assert (ROOT / "docs" / f"{guide}.md").is_file() and guide in index


def test_every_flag_of_the_example_has_a_help_text(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    import swav_config

    parser = swav_config.build_parser()
    for action in parser._actions:
        if action.help is not None and action.help != "==SUPPRESS==":
            assert action.help.strip(), action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text


def test_the_declared_ignite_floor_is_the_one_make_test_min_tries():
    floor = re.search(r"pytorch-ignite>=([\d.]+)", (ROOT / "setup.cfg").read_text()).group(1)
    tried = re.search(r"IGNITE_FLOOR \?= ([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert floor == tried
