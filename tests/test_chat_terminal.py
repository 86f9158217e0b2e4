"""`edgemoe chat` at a terminal, driven through a pseudo-terminal: slash commands, multi-line input,
Ctrl-C during an answer and at the prompt, /save and /load."""

from __future__ import annotations

import json
import re
import signal
import sys

import pexpect
import pytest
from PIL import Image

from test_runtime_fixtures import QUESTION, tiny  # noqa: F401 (fixture)

PROMPT = ">>> "


def spawn(tiny, tmp_path, *args: str) -> pexpect.spawn:
    env = {"EDGEMOE_HISTORY": str(tmp_path / "history"), "PATH": "/usr/bin:/bin", "TERM": "dumb",
           "HOME": str(tmp_path), "EDGEMOE_CACHE_DIR": str(tmp_path / "cache")}
    # A terminal user's Ctrl-C: the default handler, even when the suite itself runs in the background
    # (a shell's `cmd &` ignores SIGINT, the child inherits that, and Python then installs no handler).
    child = pexpect.spawn(sys.executable, ["-m", "edgemoe.cli", "chat", str(tiny.bundle("stablelm")), *args],
                          env=env, encoding="utf-8", timeout=120, cwd=str(tmp_path), dimensions=(40, 400),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(PROMPT)
    return child


def test_slash_commands_multiline_input_save_and_load(tiny, tmp_path) -> None:
    other = tmp_path / "other.png"
    Image.new("RGB", (40, 30), (0, 90, 200)).save(other)
    child = spawn(tiny, tmp_path, "--image", str(tiny.image), "--max-tokens", "4")
    child.sendline("/help")
    child.expect_exact("/save FILE")
    child.expect_exact(PROMPT)
    child.sendline("What is in \\")  # a trailing backslash continues the question on the next line
    child.sendline("the image?")
    child.expect(r"prompt tokens .* tok/s")
    child.expect_exact(PROMPT)
    child.sendline("/stats")
    child.expect(r"(\d+) tokens at")
    assert child.match.group(1) == "4"
    child.expect_exact(PROMPT)
    child.sendline("/save conv.json")
    child.expect_exact("saved to")
    child.expect_exact(PROMPT)
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"] == "<image>\nWhat is in \nthe image?"
    assert saved["images"] == [str(tiny.image.resolve())]
    child.sendline("/image nowhere.png")
    child.expect_exact("error: image not found")
    child.expect_exact(PROMPT)
    child.sendline("/image other.png")
    child.expect_exact("goes with the next question")
    child.expect_exact(PROMPT)
    child.sendline("/clear")
    child.expect_exact("conversation cleared")
    child.expect_exact(PROMPT)
    child.sendline("/load conv.json")
    child.expect_exact("loaded conv.json: 1 turn(s)")
    child.expect_exact(PROMPT)
    child.sendline('"""')  # a block: every line until the closing quotes is one question
    child.sendline("And the colour,")
    child.sendline("in one word?")
    child.sendline('"""')
    child.expect(r"tok/s")
    child.expect_exact(PROMPT)
    child.sendline("/save again.json")
    child.expect_exact("saved to")
    child.expect_exact(PROMPT)
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["messages"][:2] == saved["messages"] and again["messages"][2]["content"] == "And the colour,\nin one word?"
    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "What is in" in (tmp_path / "history").read_text()  # readline's history was kept


def test_ctrl_c_stops_an_answer_and_twice_at_the_prompt_exits(tiny, tmp_path) -> None:
    child = spawn(tiny, tmp_path, "--max-tokens", "3000", "--image", str(tiny.image))
    child.sendline(QUESTION)
    child.expect_exact(QUESTION)  # the terminal's echo
    child.expect(r"\S{3}")  # the answer has started streaming
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact(PROMPT)
    child.sendline("/stats")
    child.expect(r"(\d+) tokens at")
    assert 0 < int(child.match.group(1)) < 3000
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect_exact("Ctrl-C again to exit")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("command", ["/save", "/load missing.json"])
def test_a_failing_command_is_one_line_and_the_chat_goes_on(tiny, tmp_path, command: str) -> None:
    child = spawn(tiny, tmp_path, "--max-tokens", "2")
    child.sendline(command)
    child.expect(r"error: [^\r\n]+\r\n")
    assert re.search("needs a file name|cannot read", child.after)
    child.expect_exact(PROMPT)
    child.sendline("hello")
    child.expect("tok/s")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
