"""Every command the README shows, run as the README shows it.

Commands on the repository's own data (the tour on ../shared/data/cifar10-test-jpg, the evaluation
of the shared feature files, training on them) run for real, in order, with ``runs/`` moved into a
temporary folder. Commands on data this machine cannot have (``/data/...`` paths, hub weights, a
cluster launcher) are checked for their form: ``train.py`` parses them (``--print_config``),
``evaluate.py`` parses its options, the shard tools fail only on the missing files, never on an option.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest
from braceexpand import braceexpand

from tests.conftest import ROOT, run_script, shared

README = (ROOT / "README.md").read_text()


def _commands() -> list[list[str]]:
    """The command lines of the README's bash blocks and inline torchrun recipe, as argument lists."""
    out = []
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    blocks += [m.replace("\n", " ") for m in re.findall(r"`(torchrun [^`]*)`", README)]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                words = [w for part in shlex.split(line) for w in braceexpand(part)]
                out.append(words)
    return out


COMMANDS = _commands()


def _on_local_data(words: list[str]) -> bool:
    return not any(w.startswith(("/data", "HOST", "oidv7")) or "://" in w or w in ("openai", "...") or "runs/imo" in w
                   or "caltech-imo" in w for w in words)


def _strip_launcher(words: list[str]) -> list[str]:
    """``srun``/``torchrun ... train.py`` -> ``python train.py``: the command each task runs."""
    if words[0] in ("srun", "torchrun"):
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return ["python", *words[script:]]
    return words


def test_the_readme_shows_the_commands_this_test_runs():
    forms = {" ".join(_strip_launcher(c)[:3]) for c in COMMANDS if c[0] != "make"}
    assert {"python -m datamodules.shards", "python train.py predict", "python train.py fit",
            "python evaluate.py --features", "python -m datamodules.openimages"} <= forms, forms


@pytest.mark.timeout(900)
def test_every_readme_command_runs_or_parses(tmp_path):
    shared("cifar10-test-jpg")
    ran, parsed = [], []
    for words in COMMANDS:
        if words[0] == "make":
            continue  # make demo / make test: the demo is tested below, the suite is this
        local = _on_local_data(words)  # before the launcher goes: its rendezvous host is not here
        words = _strip_launcher(words)
        args = [w.replace("runs/", f"{tmp_path}/runs/") for w in words[1:]]
        if words[1] == "-m":
            script, args = words[2], args[2:]
        else:
            script, args = words[1], args[1:]
        if local:
            assert _run(script, args) == 0, words
            ran.append(" ".join(words[:4]))
        else:
            _check_form(script, [a for a in args if a != "..."])
            parsed.append(" ".join(words[:4]))
    print(f"\n[readme] ran {len(ran)} commands, checked the form of {len(parsed)}")
    assert len(ran) >= 7 and len(parsed) >= 5


def _run(script: str, args: list[str]) -> int:
    """The command in this process (the child-process form of each entry point is tested elsewhere)."""
    import importlib

    from clip_adapters import benchmark, evaluate, train

    main = {"train.py": train.main, "evaluate.py": evaluate.main, "benchmark.py": benchmark.main}.get(script)
    return (main or importlib.import_module(script).main)(args)


def _in_process(main, args: list[str]) -> tuple[int, str]:
    """Exit status and stderr of an entry point called in this process (parsing only: no start-up cost)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            status = main(args)
        except SystemExit as e:  # --print_config and argparse errors exit
            status = e.code
    return int(status or 0), err.getvalue()


def _check_form(script: str, args: list[str]) -> None:
    import importlib

    from clip_adapters import benchmark, evaluate, train

    if script == "train.py":
        status, err = _in_process(train.main, [*args, "--print_config"])
        assert status == 0, (args, err[-1500:])
    elif script in ("evaluate.py", "benchmark.py"):
        (evaluate if script == "evaluate.py" else benchmark).parse_args(args)  # an unknown option exits 2
    else:
        status, err = _in_process(importlib.import_module(script).main, args)
        assert status == 2 and "unrecognized arguments" not in err, err[-1000:]


def test_make_demo_runs_offline_end_to_end(tmp_path):
    result = run_script("demo.py", "--run_dir", tmp_path / "demo", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "demo" / "dac" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "demo" / "eval_results.json").is_file()


def test_the_demo_never_writes_over_an_earlier_demo(tmp_path):
    import demo

    base = tmp_path / "demo"
    assert demo.fresh_run_dir(base) == base
    base.mkdir()
    assert demo.fresh_run_dir(base) == base  # an empty directory is free
    (base / "eval_results.json").write_text("{}")
    (tmp_path / "demo-2").mkdir()
    (tmp_path / "demo-2" / "x").write_text("")
    assert demo.fresh_run_dir(base) == tmp_path / "demo-3"
    assert demo.main(["--run_dir", str(base)]) == 2  # an explicit directory that holds a run: refused
    assert (base / "eval_results.json").read_text() == "{}"
