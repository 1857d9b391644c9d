"""`localmix chat`: the loop and its commands against a fake streaming callable (fast), then the
real thing in a real terminal (tmux) on the tiny model: streaming, Ctrl-C, /set, /save and
/load, and the input history across two runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_localmix

from localmix.errors import InputError
from localmix.frontends.chat import ChatSession
from localmix.frontends.commands import apply_setting
from localmix.frontends.render import stats_line
from localmix.frontends.terminal import open_block, read_message, unquote
from localmix.runtime.stream import Done, Piece, Sampling

# ---- fakes ----

class FakeUI:
    """Scripted input (strings, or KeyboardInterrupt / EOFError to raise) and recorded output."""

    def __init__(self, *inputs, ctrl_c_at_piece: int | None = None):
        self.inputs = list(inputs)
        self.out: list[tuple[str, str]] = []  # (kind, text)
        self.replies: list[str] = []
        self.ctrl_c_at_piece, self.pieces = ctrl_c_at_piece, 0

    def read(self, continuation=False):
        if not self.inputs:
            raise EOFError
        item = self.inputs.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    def begin_reply(self):
        self.replies.append("")

    def piece(self, text):
        self.replies[-1] += text
        self.pieces += 1
        if self.pieces == self.ctrl_c_at_piece:
            # the user's Ctrl-C, raised in the main thread while it draws the reply, as Python
            # raises a real one (the signal itself is the terminal tests' part, through tmux)
            raise KeyboardInterrupt

    def end_reply(self, text):
        pass

    def print(self, text):
        self.out.append(("print", text))

    def info(self, text):
        self.out.append(("info", text))

    def error(self, text):
        self.out.append(("error", text))

    def lines(self, kind):
        return [t for k, t in self.out if k == kind]


class FakeModel:
    """A streaming callable: replies "reply N to <last message>" word by word, and records what it saw."""

    def __init__(self, interrupt_after: int | None = None, fail: Exception | None = None):
        self.calls: list[tuple[list[dict], Sampling]] = []
        self.interrupt_after, self.fail = interrupt_after, fail

    def __call__(self, messages, sampling, cancel):
        self.calls.append(([dict(m) for m in messages], sampling))
        if self.fail:
            raise self.fail
        words = f"reply {len(self.calls)} to {messages[-1]['content']}".split()
        if self.interrupt_after is not None and len(self.calls) == 1:
            words += [f"w{i}" for i in range(1000)]
        text, n = [], 0
        for n, word in enumerate(words[: sampling.max_tokens], 1):
            if cancel.is_set():
                n -= 1
                break
            piece = word if n == 1 else " " + word
            text.append(piece)
            yield Piece(n, piece)
            if n == self.interrupt_after and len(self.calls) == 1:
                assert cancel.wait(30)  # until the session takes the user's Ctrl-C (FakeUI's)
        reason = "cancelled" if cancel.is_set() else "eos"
        yield Done(reason, sum(len(m["content"].split()) for m in messages), 3, n, 0.01, 0.02, "".join(text))


def count_words(messages):
    return sum(len(m["content"].split()) + 2 for m in messages)


def session(model=None, **kwargs):
    return ChatSession(model or FakeModel(), model="fake.gguf", **kwargs)


# ---- the loop and its commands ----

def test_a_reply_streams_and_joins_the_conversation():
    model, ui = FakeModel(), FakeUI("hello there", "and again")
    s = session(model)
    s.run(ui)
    assert ui.replies == ["reply 1 to hello there", "reply 2 to and again"]
    assert [m["role"] for m in model.calls[1][0]] == ["user", "assistant", "user"]
    assert s.conversation.turns[-1] == {"role": "assistant", "content": "reply 2 to and again"}
    stats = [t for t in ui.lines("info") if t.startswith("prompt ")]
    assert len(stats) == 2 and "reply 5 tokens" in stats[0] and "first token in 0.01 s" in stats[0]


def test_set_parses_values_and_rejects_bad_ones():
    s = Sampling()
    assert apply_setting(s, "temperature", "0").temperature == 0.0
    assert apply_setting(s, "top-k", "5").top_k == 5
    assert apply_setting(s, "temp", "1.5").temperature == 1.5
    assert apply_setting(s, "seed", "42").seed == 42 and apply_setting(s, "seed", "random").seed is None
    assert apply_setting(s, "max_tokens", "400").max_tokens == 400
    assert apply_setting(s, "stop", '"User:" ###').stop == ("User:", "###")
    assert apply_setting(s, "stop", r"\n").stop == ("\n",)
    assert apply_setting(s, "stop", "none").stop == ()
    for name, value in [("temperature", "hot"), ("temperature", "-1"), ("temperature", "nan"), ("top_p", "2"),
                        ("top_k", "1.5"), ("max_tokens", "0"), ("seed", "x"), ("colour", "1"), ("min_p", "")]:
        with pytest.raises(InputError):
            apply_setting(s, name, value)

    ui = FakeUI("/set temperature 0.2", "/set temperature warm", "/set", "/set nonsense 3", "/set max_tokens 2", "hi")
    sess = session()
    sess.run(ui)
    assert sess.sampling.temperature == 0.2 and sess.sampling.max_tokens == 2
    errors = ui.lines("error")
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "warm" in errors[0] and "nonsense" in errors[2]
    assert ui.replies == ["reply 1"]  # max_tokens 2 reached the fake


def test_save_then_load_round_trip(tmp_path):
    path = tmp_path / "talk.json"
    first = session(system="Be brief.")
    first.run(FakeUI("one", "two", f"/save {path}"))
    saved = json.loads(path.read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]

    second, ui = session(), FakeUI(f"/load {path}", "three")
    second.run(ui)
    assert second.conversation.system == "Be brief."
    assert second.conversation.messages()[:5] == saved["messages"]
    assert second.reply.calls[0][0][:5] == saved["messages"]  # the model saw the loaded conversation
    assert any("loaded 4 messages" in t for t in ui.lines("info"))


def test_load_rejects_what_is_not_a_conversation(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    two_users = tmp_path / "two.json"
    two_users.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))
    s, ui = session(), FakeUI("kept", f"/load {bad_json}", f"/load {two_users}", f"/load {tmp_path / 'none.json'}")
    s.run(ui)
    assert len(ui.lines("error")) == 3 and "alternate" in ui.lines("error")[1]
    assert s.conversation.turns[0]["content"] == "kept"


def test_system_prompt_is_sent_first_and_can_change():
    model = FakeModel()
    s = session(model, system="You are terse.")
    s.run(FakeUI("a", "/system You are verbose.", "b", "/system", "c"))
    assert model.calls[0][0][0] == {"role": "system", "content": "You are terse."}
    assert model.calls[1][0][0] == {"role": "system", "content": "You are verbose."}
    assert model.calls[2][0][0]["role"] == "user"


def test_clear_keeps_the_system_prompt():
    model = FakeModel()
    s = session(model, system="Sys.")
    s.run(FakeUI("a", "b", "/clear", "c"))
    assert model.calls[2][0] == [{"role": "system", "content": "Sys."}, {"role": "user", "content": "c"}]


def test_regen_replaces_the_last_reply():
    model = FakeModel()
    s, ui = session(model), FakeUI("/regen", "question", "/regen")
    s.run(ui)
    assert "nothing to regenerate" in ui.lines("error")[0]
    assert model.calls[1][0] == model.calls[0][0] == [{"role": "user", "content": "question"}]
    assert s.conversation.turns == [{"role": "user", "content": "question"},
                                    {"role": "assistant", "content": "reply 2 to question"}]


def test_read_sends_a_file_and_more_text(tmp_path):
    notes = tmp_path / "my notes.txt"
    notes.write_text("Line one.\nLine two.\n")
    model, ui = FakeModel(), FakeUI(f'/read "{notes}" Summarise this', "/read", f"/read {tmp_path}/missing.txt")
    session(model).run(ui)
    assert model.calls[0][0][-1]["content"] == "Line one.\nLine two.\n\nSummarise this"
    assert len(ui.lines("error")) == 2 and "no such file" in ui.lines("error")[1]


def test_context_dropping_keeps_the_system_prompt_and_says_so():
    model = FakeModel()
    # each message costs its words + 2; the budget is 40 - min(8, 40 // 4) = 32
    s = session(model, system="short system prompt", n_ctx=40, count_tokens=count_words,
                sampling=Sampling(max_tokens=8))
    ui = FakeUI(*[f"message number {i} has six words" for i in range(4)])
    s.run(ui)
    for messages, _ in model.calls:
        assert messages[0] == {"role": "system", "content": "short system prompt"}
        assert count_words(messages) <= 32 and messages[-1]["role"] == "user"
    assert model.calls[-1][0][-1]["content"] == "message number 3 has six words"
    assert [m["role"] for m in model.calls[-1][0]][1:3] == ["user", "assistant"]  # whole exchanges dropped
    dropped = [t for t in ui.lines("info") if "dropped" in t]
    assert dropped and all("\n" not in t and "40 tokens" in t for t in dropped)


def test_ctrl_c_mid_reply_keeps_the_partial_reply():
    model = FakeModel(interrupt_after=3)
    s, ui = session(model), FakeUI("tell me everything", "next", ctrl_c_at_piece=3)
    s.run(ui)
    partial = s.conversation.turns[1]
    assert partial["role"] == "assistant" and partial["content"] == "reply 1 to"
    assert ui.replies[0] == "reply 1 to"
    assert "stopped: interrupted" in [t for t in ui.lines("info") if t.startswith("prompt ")][0]
    assert model.calls[1][0][1] == partial  # the session went on, with the partial reply in it
    assert s.conversation.turns[-1]["content"].startswith("reply 2 to next")


def test_ways_to_quit():
    for inputs in [("/exit", "never"), (EOFError, "never"), (KeyboardInterrupt, KeyboardInterrupt, "never")]:
        model = FakeModel()
        session(model).run(FakeUI(*inputs))
        assert model.calls == []
    model, ui = FakeModel(), FakeUI(KeyboardInterrupt, "still here", KeyboardInterrupt, "/bogus", KeyboardInterrupt)
    session(model).run(ui)
    assert len(model.calls) == 1 and "Ctrl-C again" in ui.lines("info")[0]
    assert "unknown command /bogus" in ui.lines("error")[0]


def test_a_failing_reply_is_one_line_and_leaves_the_conversation_as_it_was():
    s, ui = session(FakeModel(fail=InputError("the prompt has 300 tokens but the context holds 256")),), FakeUI("x")
    s.run(ui)
    assert ui.lines("error") == ["the prompt has 300 tokens but the context holds 256"]
    assert s.conversation.turns == []


def test_triple_quotes_make_one_message_of_several_lines():
    ui = FakeUI('"""first line', "second line", 'third"""')
    text = read_message(ui)
    assert unquote(text) == (True, "first line\nsecond line\nthird")
    assert open_block('"""') and open_block('"""abc') and not open_block('"""abc"""') and not open_block('""""""')
    model = FakeModel()
    session(model).run(FakeUI('"""', "/not a command", '"""'))
    assert model.calls[0][0][-1]["content"] == "/not a command"


def test_show_and_stats():
    s, ui = session(n_ctx=100, count_tokens=count_words), FakeUI("/stats", "hello", "/show", "/stats", "/help")
    s.run(ui)
    printed = ui.lines("print")
    assert printed[0] == "no replies yet"
    assert "fake.gguf" in printed[1] and "100 tokens, 9 used (9%)" in printed[1] and "temperature" in printed[1]
    assert "replies         1" in printed[2]
    assert "/regen" in printed[3]


def test_stats_line():
    line = stats_line(Done("length", 120, 20, 65, 0.5, 2.0, "x"))
    assert line == ("prompt 120 tokens (20 new, 40 t/s), reply 65 tokens (32.0 t/s), first token in 0.50 s, "
                    "stopped: max_tokens")
    assert "all cached" in stats_line(Done("eos", 10, 0, 1, 0.0, 0.1))


def test_plain_ui_in_a_pipe(converted):
    model = converted("mixtral", "Q8_0")
    r = run_localmix("chat", model, "--ctx", "512", "-n", "8", "--seed", "1",
                     input="Hello\n/set max_tokens 4\n/bogus\nAgain\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 2 and "Traceback" not in r.stderr
    assert "reply 8 tokens" in r.stderr and "reply 4 tokens" in r.stderr and "unknown command /bogus" in r.stderr


# ---- a real terminal ----

TMUX = shutil.which("tmux")
PROMPT = ">>> "


class Terminal:
    """`localmix chat` in a detached tmux session: 100x30, TERM=xterm-256color."""

    def __init__(self, args, env, socket):
        self.socket = str(socket)
        command = " ".join([sys.executable, "-m", "localmix", "chat", *map(str, args)])
        env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        self.tmux("new-session", "-d", "-x", "100", "-y", "30", *env_args, "-c", str(REPO), command)

    def tmux(self, *args) -> str:
        return subprocess.run([TMUX, "-S", self.socket, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J")

    def send(self, *keys, enter=True):
        self.tmux("send-keys", "-l", *keys) if keys else None
        if enter:
            self.tmux("send-keys", "Enter")

    def key(self, name):
        self.tmux("send-keys", name)

    def wait_for(self, check, timeout=60.0) -> str:
        end = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > end:
                raise AssertionError(f"timed out; the screen was:\n{screen}")
            time.sleep(0.05)

    def wait_count(self, text, n, timeout=60.0) -> str:
        return self.wait_for(lambda s: s.count(text) >= n, timeout)

    def close(self):
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal(converted, tmp_path):
    if TMUX is None:
        pytest.skip("tmux is not installed")
    model = converted("mixtral", "Q8_0")
    opened = []

    def open_(*flags, data_home=None):
        env = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "XDG_DATA_HOME": str(data_home or tmp_path / "data"),
               "PYTHONPATH": str(REPO)}
        t = Terminal([model, "--ctx", "2048", *flags], env, tmp_path / f"tmux-{len(opened)}")
        opened.append(t)
        t.wait_for(lambda s: s.rstrip().endswith(PROMPT.strip()), timeout=30)
        return t

    yield open_
    for t in opened:
        t.close()


def replies(screen: str) -> int:
    return len(re.findall(r"^prompt \d+ tokens", screen, re.M))


def after(screen: str, typed: str) -> str:
    """What the screen shows below the line where `typed` was entered ("" until it shows)."""
    return screen.split(PROMPT + typed, 1)[1].strip() if PROMPT + typed in screen else ""


def test_terminal_streams_then_ctrl_c_stops_a_reply(terminal):
    t = terminal("--no-history", "--seed", "1")
    t.send("/set max_tokens 400")
    t.wait_for(lambda s: "max_tokens = 400" in s)
    t.send("Tell me a long story")
    # the reply arrives in pieces: the screen shows it growing before the stats line
    seen = []
    end = time.monotonic() + 30
    while time.monotonic() < end and len(seen) < 3:
        screen = t.screen()
        if replies(screen):
            break
        body = after(screen, "Tell me a long story")
        if body and (not seen or seen[-1] != body):
            seen.append(body)
        time.sleep(0.02)
    assert len(seen) >= 2, seen  # two different screens before the reply ended
    assert len(seen[0].split()) < len(seen[-1].split())
    t.key("C-c")  # no need to wait for the rest
    t.wait_for(lambda s: replies(s) >= 1)

    t.send("Another long story please")
    t.wait_for(lambda s: after(s, "Another long story please"))  # the reply has begun
    t.key("C-c")
    t.wait_for(lambda s: "stopped: interrupted" in s.split("Another long story please")[-1], timeout=30)
    t.send("/set max_tokens 5")
    t.send("Short one")
    # the stats line, then the prompt back (drawn a moment after it: wait for both)
    screen = t.wait_for(lambda s: replies(s) >= 3 and s.rstrip().endswith(PROMPT.strip()))
    assert re.search(r"reply [0-5] tokens", screen.split("Short one")[-1])
    t.send("/exit")


def test_terminal_temperature_zero_repeats_and_save_load(terminal, tmp_path):
    t = terminal("--no-history", "--raw")
    t.send("/set temperature 0")
    t.send("/set max_tokens 12")
    for n, name in enumerate("ab", 1):
        t.send("Same question")
        t.wait_for(lambda s: replies(s) >= n)
        t.send(f"/save {tmp_path / name}.json")
        t.wait_count("saved 2 messages to", n)
        t.send("/clear")
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["messages"] for n in "ab")
    assert a == b and a[1]["role"] == "assistant" and a[1]["content"]

    t.send(f"/load {tmp_path / 'a.json'}")
    t.wait_for(lambda s: "loaded 2 messages" in s)
    t.send(f"/save {tmp_path / 'c.json'}")
    t.wait_for(lambda s: "c.json" in s)
    assert json.loads((tmp_path / "c.json").read_text())["messages"] == a
    t.send("/show")
    t.wait_for(lambda s: "conversation    2 messages" in s)

    # a bracketed paste of several lines is one message, sent by the Enter after it
    t.tmux("set-buffer", "-b", "clip", "pasted one\npasted two")
    t.tmux("paste-buffer", "-p", "-b", "clip")
    t.send()
    t.wait_for(lambda s: "... pasted two" in s and replies(s.split("... pasted two")[-1]))
    t.send(f"/save {tmp_path / 'd.json'}")
    t.wait_count("saved 4 messages to", 1)
    assert json.loads((tmp_path / "d.json").read_text())["messages"][2]["content"] == "pasted one\npasted two"


def test_terminal_history_persists_across_runs(terminal, tmp_path):
    data = tmp_path / "history-home"
    first = terminal(data_home=data)
    first.send("/set seed 7")
    first.wait_for(lambda s: "seed = 7" in s)
    first.key("C-d")
    history = data / "localmix" / "chat_history"
    end = time.monotonic() + 10
    while "/set seed 7" not in history.read_text() and time.monotonic() < end:
        time.sleep(0.05)
    assert "/set seed 7" in history.read_text()

    second = terminal(data_home=data)
    second.key("Up")
    second.wait_for(lambda s: s.rstrip().endswith(">>> /set seed 7"), timeout=30)
