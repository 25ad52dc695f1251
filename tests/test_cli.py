"""The ``edge-ad`` entry point itself (edge_ad/cli/__init__.py): Ctrl-C outside a command's own handling."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

# Runs the entry point as the installed `edge-ad` script does (`from edge_ad.cli import main; sys.exit(main())`),
# after arranging a Ctrl-C (SIGINT to itself) at a set point: WHEN is a module whose import sends it, or "atexit"
# (during the interpreter's shutdown, once the command is done).
ENTRY = """
import atexit, os, signal, sys

when, sys.argv = sys.argv[1], ["edge-ad", *sys.argv[2:]]


class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == when:
            os.kill(os.getpid(), signal.SIGINT)


if when == "atexit":
    atexit.register(os.kill, os.getpid(), signal.SIGINT)
else:
    sys.meta_path.insert(0, CtrlC())
from edge_ad.cli import main
sys.exit(main())
"""


def _entry(tmp_path, when, *argv):
    script = tmp_path / "entry.py"
    script.write_text(ENTRY)
    return subprocess.run([sys.executable, str(script), when, *argv], capture_output=True, text=True,
                          cwd=tmp_path, start_new_session=True)


def test_ctrl_c_while_the_commands_load_says_interrupted_and_exits_130(tmp_path):
    """Ctrl-C while Python was still importing (`edge-ad bundle pack` at 0.8 s) printed a KeyboardInterrupt
    traceback of whatever import it hit and died by the signal. Now: `interrupted`, exit 130."""
    for module in ("click", "edge_ad.cli.run"):
        r = _entry(tmp_path, module, "generic-images", "--out", "g", "--count", "1", "--image-size", "32")
        assert (r.returncode, r.stdout, r.stderr) == (130, "", "interrupted\n"), (module, r.stderr)
        assert not (tmp_path / "g").exists()


def test_ctrl_c_while_click_parses_the_arguments_says_interrupted_and_exits_130(monkeypatch):
    """click turned it into `Aborted!` and exit 1."""
    import click
    from click.testing import CliRunner

    from edge_ad.cli import main

    def parse_args(self, ctx, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(click.Group, "parse_args", parse_args)
    r = CliRunner().invoke(main, ["generic-images", "--help"])
    assert (r.exit_code, r.stderr) == (130, "interrupted\n")


def test_a_command_that_finished_keeps_its_exit_status_on_a_late_ctrl_c(tmp_path):
    """Ctrl-C once the command had done its work (`wrote out.tar` printed) could still end it: a traceback
    from the interpreter's shutdown, or a death by the signal once the shutdown had put the default handler
    back. The entry point now ignores Ctrl-C when the command is done: its own exit status, and nothing more."""
    r = _entry(tmp_path, "atexit", "generic-images", "--out", "g", "--count", "1", "--image-size", "32")
    assert (r.returncode, r.stdout, r.stderr) == (0, "1 generic images in g\n", ""), r.stderr
    (tmp_path / "taken").write_text("x")
    r = _entry(tmp_path, "atexit", "generic-images", "--out", "taken", "--count", "1", "--image-size", "32")
    assert r.returncode == 2 and r.stderr == "error: taken: is a file; expected a folder to write the generic " \
                                             "images into\n", r.stderr
    # the same Ctrl-C after the shutdown, from the C library's exit handlers: it killed the process (-2)
    on_exit = getattr(__import__("ctypes").CDLL(None), "on_exit", None)
    if on_exit is None:
        pytest.skip("no on_exit in this C library (glibc has it)")
    late = tmp_path / "late.py"
    late.write_text("import ctypes, signal, sys\n"
                    # on_exit calls kill(status, arg): for the status 0, kill(0, SIGINT), this process group's
                    "libc = ctypes.CDLL(None)\n"
                    "kill = ctypes.cast(libc.kill, ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p))\n"
                    f"libc.on_exit(kill, ctypes.c_void_p({int(signal.SIGINT)}))\n"
                    "sys.argv = ['edge-ad', *sys.argv[1:]]\n"
                    "from edge_ad.cli import main\n"
                    "sys.exit(main())\n")
    r = subprocess.run([sys.executable, str(late), "generic-images", "--out", "g", "--count", "1", "--image-size",
                        "32"], capture_output=True, text=True, cwd=tmp_path, start_new_session=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "1 generic images in g\n", ""), r.stderr
