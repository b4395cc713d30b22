"""Reasoning and tool-call parsing of one chat choice's generated text (pure Python, no vLLM).

The split follows vLLM's OpenAI server (its ``Parser.parse`` / ``Parser.parse_delta``): the reasoning
parser runs first and the tool parser sees only the content part, never the reasoning. Streaming
works on text (markers arrive as text because the frontend detokenizes with special tokens kept) and
holds back only a suffix that may be the start of a marker. tests/unit/test_chat_output.py compares
every format against vLLM's own parsers.
"""

from __future__ import annotations

import json
import re

from dynamo_lite.frontend.tool_calls import (OutputDelta, ParsedMessage, ToolCall, ToolCallDelta, make_tool_call_id,
                                             random_alnum)

from dynamo_lite.frontend.parsers.harmony import Header, HarmonyReader, tool_arguments

TOOL_PARSERS: tuple[str, ...] = ("hermes", "llama3_json", "mistral", "openai")
# "openai_gptoss" is vLLM's name for the gpt-oss reasoning parser; "openai" is the same here.
REASONING_PARSERS: tuple[str, ...] = ("deepseek_r1", "qwen3", "openai", "openai_gptoss")


def partial_overlap(text: str, marker: str) -> int:
    """Length of the longest proper prefix of ``marker`` that ends ``text``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


# ---------------------------------------------------------------------------------------------- reasoning

class ThinkReasoning:
    """``<think>…</think>`` reasoning that starts open: the chat template may already have written
    ``<think>`` (DeepSeek-R1, Qwen3), so text is reasoning until the end marker. Qwen3's parser also
    ends reasoning at ``<tool_call>``, which then stays in the content."""

    START, END = "<think>", "</think>"

    def __init__(self, ends_at_tool_call: bool):
        self._tool_end = "<tool_call>" if ends_at_tool_call else None
        self._markers = [m for m in (self.START, self.END, self._tool_end) if m]
        self._held = ""
        self.ended = False

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that can be emitted now."""
        if self.ended:
            return "", text
        text = self._held + text
        self._held = ""
        reasoning = []
        while True:
            hits = [(text.find(m), m) for m in self._markers if m in text]
            if not hits:
                break
            pos, marker = min(hits)
            reasoning.append(text[:pos])
            if marker == self.START:  # vLLM drops a start marker seen inside reasoning
                text = text[pos + len(marker):]
                continue
            self.ended = True
            content = text[pos + len(marker):] if marker == self.END else text[pos:]
            return "".join(reasoning), content
        hold = max(partial_overlap(text, m) for m in self._markers)
        self._held = text[len(text) - hold:] if hold else ""
        reasoning.append(text[:len(text) - hold])
        return "".join(reasoning), ""

    def finish(self) -> tuple[str, str]:
        # A held partial marker at the end was reasoning text after all.
        held, self._held = self._held, ""
        return held, ""

    def whole(self, text: str) -> tuple[str | None, str | None]:
        # vLLM: drop everything up to the first <think> (if any), then split at the end marker.
        before, start, after = text.partition(self.START)
        text = after if start else before
        end = self.END
        if self._tool_end is not None:
            i, j = text.find(self.END), text.find(self._tool_end)
            if j != -1 and (i == -1 or j < i):
                # vLLM oddity: its Qwen3 engine drops a later "</think>" from this content when
                # parsing whole text, but keeps it when streaming; each path matches vLLM's.
                return text[:j] or None, text[j:].replace(self.END, "") or None
        if end not in text:
            return text, None
        reasoning, _, content = text.partition(end)
        # vLLM's DeepSeek-R1 parser gives "" for an empty reasoning part, Qwen3's engine gives None
        return (reasoning or None) if self._tool_end else reasoning, content or None


def prompt_ends_reasoning(prompt_text: str) -> bool:
    """True when the rendered prompt already closed the thinking block (Qwen3's template with
    enable_thinking false writes an empty ``<think>\n\n</think>``): the answer is content from its first
    token. vLLM's streaming path decides the same from the prompt (``is_reasoning_end``); its whole path
    does not and would call the answer reasoning."""
    return prompt_text.rfind(ThinkReasoning.END) > prompt_text.rfind(ThinkReasoning.START) >= 0


def make_reasoning(name: str) -> ThinkReasoning:
    if name == "deepseek_r1":
        return ThinkReasoning(ends_at_tool_call=False)
    if name == "qwen3":
        return ThinkReasoning(ends_at_tool_call=True)
    raise ValueError(f"unknown reasoning parser {name!r}; choose from {', '.join(REASONING_PARSERS)}")


# -------------------------------------------------------------------------------------------- tool calls

class HermesTools:
    """``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` (Hermes 2 Pro, Qwen2.5/3).

    Streaming re-parses the whole content so far on every feed, as vLLM's Hermes2ProToolParser does,
    so the same pieces come out: names once complete, argument text diffed against what was sent.
    """

    START, END = "<tool_call>", "</tool_call>"
    _CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
    _NAME_RE = re.compile(r'"name"\s*:\s*"([^"]+)"')
    _ARGS_RE = re.compile(r'"arguments"\s*:\s*')

    def __init__(self) -> None:
        self._text = ""
        self._sent_content = 0
        self._names: list[str | None] = []
        self._args: list[str] = []

    def whole(self, text: str) -> tuple[list[tuple[str, str]], str | None]:
        """(calls, content) as vLLM's extract_tool_calls; no calls means the text stays content."""
        if self.START not in text:
            return [], text
        try:
            raw = [json.loads(a or b) for a, b in self._CALL_RE.findall(text)]
            calls = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in raw]
        except Exception:  # vLLM: any malformed call turns the whole text back into content
            return [], text
        return calls, text[:text.find(self.START)] or None

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._text += text
        current = self._text
        if self.START in current:
            sendable = current.index(self.START)
        else:
            sendable = len(current) - partial_overlap(current, self.START)
        content = ""
        if sendable > self._sent_content:
            content = current[self._sent_content:sendable]
            self._sent_content = sendable
        deltas: list[ToolCallDelta] = []
        for i, (body, complete) in enumerate(self._bodies(current)):
            if i >= len(self._names):
                self._names.append(None)
                self._args.append("")
            if self._names[i] is None:
                m = self._NAME_RE.search(body)
                if not m:
                    break  # call i+1 cannot start before call i has a name
                self._names[i] = m.group(1)
                deltas.append(ToolCallDelta(index=i, id=make_tool_call_id(), name=m.group(1)))
            args = self._arguments(body, complete)
            if args is not None and len(args) > len(self._args[i]):
                deltas.append(ToolCallDelta(index=i, arguments=args[len(self._args[i]):]))
                self._args[i] = args
        return content, deltas

    def finish(self) -> str:
        # Deliberate difference: vLLM drops a held partial "<tool_call>" prefix at the end of the
        # stream (e.g. a final "<"); it was content, so it is sent.
        if self.START in self._text:
            return ""
        rest = self._text[self._sent_content:]
        self._sent_content = len(self._text)
        return rest

    def _bodies(self, text: str) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        pos = 0
        while (start := text.find(self.START, pos)) != -1:
            body_start = start + len(self.START)
            end = text.find(self.END, body_start)
            if end != -1:
                out.append((text[body_start:end].strip(), True))
                pos = end + len(self.END)
                continue
            raw = text[body_start:]
            overlap = partial_overlap(raw, self.END)
            body = (raw[:-overlap] if overlap else raw).strip()
            out.append((body, bool(body) and _is_json(body)))
            break
        return out

    @classmethod
    def _arguments(cls, body: str, complete: bool) -> str | None:
        m = cls._ARGS_RE.search(body)
        if not m:
            return None
        raw = body[m.end():]
        if complete:  # drop the brace that closes the outer object
            raw = raw.rstrip()
            if raw.endswith("}"):
                raw = raw[:-1].rstrip()
        return raw


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class Llama3JsonTools:
    """Llama 3.x JSON calls: ``{"name": …, "parameters"|"arguments": {…}}``, several joined by "; ",
    optionally after ``<|python_tag|>``; only when the output starts with one of them.

    Whole text follows vLLM's Llama3JsonToolParser exactly. Streaming differs in granularity: vLLM
    streams argument prefixes through partial-JSON parsing; here a call goes out whole (name, then
    its json.dumps arguments) once its object is complete, which is what vLLM's pieces add up to.
    """

    BOT = "<|python_tag|>"
    _decoder = json.JSONDecoder()

    def __init__(self) -> None:
        self._text = ""
        self._mode: str | None = None  # "content" or "json", decided by the output's first chars
        self._pos = 0
        self._count = 0

    def whole(self, text: str) -> tuple[list[tuple[str, str]], str | None]:
        if self.BOT not in text and "{" not in text:
            return [], text
        calls, end = [], -1
        for m in re.finditer(r"\{", text):
            if m.start() <= end:
                continue  # a brace inside an object already parsed
            try:
                obj, length = self._decoder.raw_decode(text[m.start():])
                end = m.start() + length
                args = obj["arguments"] if "arguments" in obj else obj["parameters"]
                calls.append((obj["name"], json.dumps(args, ensure_ascii=False)))
            except Exception:  # vLLM: one bad object turns the whole text back into content
                return [], text
        return (calls, None) if calls else ([], text)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._text += text
        if self._mode is None:
            head = self._text
            if head.startswith(self.BOT) or head.startswith("{"):
                self._mode = "json"
                self._pos = len(self.BOT) if head.startswith(self.BOT) else 0
            elif self.BOT.startswith(head):
                return "", []  # may still become <|python_tag|>
            else:
                self._mode = "content"
                return self._text, []
        if self._mode == "content":
            return text, []
        deltas: list[ToolCallDelta] = []
        while True:
            rest = self._text[self._pos:]
            stripped = rest.lstrip("; \n\t")
            if not stripped:
                break
            try:
                obj, length = self._decoder.raw_decode(stripped)
            except ValueError:
                break  # not complete yet
            self._pos += len(rest) - len(stripped) + length
            if not isinstance(obj, dict) or "name" not in obj:
                continue
            args = obj.get("arguments", obj.get("parameters"))
            i, self._count = self._count, self._count + 1
            deltas.append(ToolCallDelta(index=i, id=make_tool_call_id(), name=obj["name"]))
            if args:
                deltas.append(ToolCallDelta(index=i, arguments=json.dumps(args, ensure_ascii=False)))
        return "", deltas

    def finish(self) -> str:
        if self._mode is None:  # a bare prefix of <|python_tag|> was content
            self._mode = "content"
            return self._text
        if self._mode == "json" and self._count == 0 and self._text.strip():
            # Deliberate difference: JSON that never parsed into a call is sent as content, as vLLM's
            # whole-text parser returns it (its stream sends a partial call or nothing).
            return self._text
        return ""


def make_mistral_id() -> str:
    # Mistral's chat templates accept only 9 alphanumeric characters as a call id (vLLM does the same).
    return random_alnum(9)


def _pre_v11_calls(parsed: object) -> list[tuple[str, str]]:
    """vLLM's reading of the JSON after a pre-v11 ``[TOOL_CALLS]``."""
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list):
        return []
    calls = []
    for tc in parsed:
        if not isinstance(tc, dict) or not ("name" in tc or "arguments" in tc):
            continue
        name, args = tc.get("name"), tc.get("arguments")
        if args is None:
            args = "{}"
        elif not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append((name if isinstance(name, str) else "", args))
    return calls


def _first_json(raw: str) -> str:
    """The first complete JSON value of v11 arguments (a model may write text after it)."""
    stripped = raw.strip()
    if not stripped:
        return "{}"
    try:
        _, end = json.JSONDecoder().raw_decode(stripped)
    except ValueError:
        return stripped
    return stripped[:end]


class MistralTools:
    """Mistral ``[TOOL_CALLS]``: pre-v11 ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`` and v11+
    ``[TOOL_CALLS]name[ARGS]{…}`` (or ``name{…}``), one marker per call. The format is read from the
    text after the marker, where vLLM picks it from the tokenizer (``[ARGS]`` in the vocabulary)."""

    BOT, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def __init__(self) -> None:
        self._text = ""
        self._sent_content = 0
        self._sent: list[list] = []  # per call: [name sent, arguments sent]

    def whole(self, text: str) -> tuple[list[tuple[str, str]], str | None]:
        if self.BOT not in text:
            return [], text
        content, *segments = text.split(self.BOT)
        first = next((seg.strip() for seg in segments if seg.strip()), "")
        if first.startswith(("[", "{")):
            return self._whole_pre_v11(first, content)
        calls = [self._v11_call(seg, final=True) for seg in segments if seg.strip()]
        calls = [c for c in calls if c is not None]
        # vLLM's v11 engine strips whitespace that ends the content before the calls (whole text
        # only: its stream sends that whitespace, and so does ours)
        return [(n, a) for n, a in calls], content.rstrip() or None

    @staticmethod
    def _whole_pre_v11(body: str, content: str) -> tuple[list[tuple[str, str]], str | None]:
        try:
            parsed, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            m = re.search(r"\[{.*}\]", body, re.DOTALL)
            try:
                parsed = json.loads(m.group(0)) if m else None
            except ValueError:
                parsed = None
        calls = _pre_v11_calls(parsed)
        if not calls:  # vLLM: the text after the marker (stripped) becomes the content
            return [], body
        return calls, content if content.strip() else None

    def _v11_call(self, segment: str, final: bool) -> tuple[str, str | None] | None:
        """(name, arguments or None while incomplete) of one ``name[ARGS]{…}`` segment."""
        cut = [i for i in (segment.find(self.ARGS), segment.find("{")) if i != -1]
        if not cut:
            return (segment.strip(), "{}") if final and segment.strip() else None
        at = min(cut)
        name = segment[:at].strip()
        raw = segment[at + len(self.ARGS):] if segment.startswith(self.ARGS, at) else segment[at:]
        if final:
            return name, _first_json(raw)
        try:
            _, end = json.JSONDecoder().raw_decode(raw.strip())
        except ValueError:
            return name, None
        return name, raw.strip()[:end]

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        return self._scan(text, final=False)

    def finish(self) -> str:
        content, self._final_deltas = self._scan("", final=True)
        if self.BOT in self._text and not self._sent:
            # Deliberate difference: a pre-v11 call array that never completed is sent as content,
            # as vLLM's whole-text parser returns it (its stream sends a partial call instead).
            segments = self._text.split(self.BOT)[1:]
            content += next((seg.strip() for seg in segments if seg.strip()), "")
        return content

    def finish_calls(self) -> list[ToolCallDelta]:
        return getattr(self, "_final_deltas", [])

    def _scan(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self._text += text
        current = self._text
        if self.BOT in current:
            sendable = current.index(self.BOT)
        else:
            sendable = len(current) - (0 if final else partial_overlap(current, self.BOT))
        content = ""
        if sendable > self._sent_content:
            content = current[self._sent_content:sendable]
            self._sent_content = sendable
        if self.BOT not in current:
            return content, []
        segments = current.split(self.BOT)[1:]
        first = next((seg.strip() for seg in segments if seg.strip()), "")
        if first.startswith(("[", "{")):
            calls = self._stream_pre_v11(segments, final)
        else:
            calls = []
            for j, seg in enumerate(segments):
                last = j == len(segments) - 1
                if last and not final:
                    seg = seg[:len(seg) - partial_overlap(seg, self.BOT)]
                if seg.strip():
                    call = self._v11_call(seg, final or not last)
                    if call is not None:
                        calls.append(call)
        deltas: list[ToolCallDelta] = []
        for i, (name, args) in enumerate(calls):
            if i >= len(self._sent):
                self._sent.append([False, False])
                deltas.append(ToolCallDelta(index=i, id=make_mistral_id(), name=name))
            if args is not None and not self._sent[i][1]:
                self._sent[i][1] = True
                deltas.append(ToolCallDelta(index=i, arguments=args))
        return content, deltas

    @staticmethod
    def _stream_pre_v11(segments: list[str], final: bool) -> list[tuple[str, str | None]]:
        body = next((seg.strip() for seg in segments if seg.strip()), "")
        try:
            parsed, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            return []  # calls go out once the JSON is complete
        return [(n, a) for n, a in _pre_v11_calls(parsed)]


def make_tools(name: str) -> HermesTools | Llama3JsonTools | MistralTools:
    if name == "mistral":
        return MistralTools()
    if name == "hermes":
        return HermesTools()
    if name == "llama3_json":
        return Llama3JsonTools()
    raise ValueError(f"unknown tool call parser {name!r}; choose from {', '.join(TOOL_PARSERS)}")


# ------------------------------------------------------------------------------------------- the choice

class ChatOutput:
    """Splits ONE choice's generated text into reasoning, content and tool calls."""

    def __init__(self, tool_parser: str | None, reasoning_parser: str | None, parse_tools: bool):
        if tool_parser is not None and tool_parser not in TOOL_PARSERS:
            raise ValueError(f"unknown tool call parser {tool_parser!r}; "
                             f"choose from {', '.join(TOOL_PARSERS)}")
        if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; "
                             f"choose from {', '.join(REASONING_PARSERS)}")
        self._harmony: HarmonyOutput | None = None
        if reasoning_parser == "openai_gptoss":
            reasoning_parser = "openai"
        if "openai" in (tool_parser, reasoning_parser):
            if {tool_parser, reasoning_parser} - {"openai", None}:
                raise ValueError("the openai (gpt-oss harmony) parser cannot be mixed with another format")
            self._harmony = HarmonyOutput(tools=tool_parser == "openai" and parse_tools,
                                          reasoning=reasoning_parser == "openai")
            tool_parser = reasoning_parser = None
        self._reasoning_name = reasoning_parser
        self._tool_name = tool_parser
        self._reasoning = make_reasoning(reasoning_parser) if reasoning_parser else None
        tools = make_tools(tool_parser) if tool_parser else None
        self._tools = tools if parse_tools else None
        self._called = False

    @property
    def called_tools(self) -> bool:
        return self._called or (self._harmony is not None and self._harmony.called)

    def feed(self, text: str) -> OutputDelta | None:
        if self._harmony is not None:
            return self._harmony.feed(text)
        out = OutputDelta()
        content = text
        if self._reasoning is not None:
            out.reasoning, content = self._reasoning.feed(text)
        if self._tools is not None and content:
            out.content, out.tool_calls = self._tools.feed(content)
        else:
            out.content = content
        self._called = self._called or bool(out.tool_calls)
        return None if not out else out

    def finish(self) -> OutputDelta | None:
        if self._harmony is not None:
            return self._harmony.feed("", final=True)
        out = OutputDelta()
        if self._reasoning is not None:
            out.reasoning, _ = self._reasoning.finish()
        if self._tools is not None:
            out.content = self._tools.finish()
            if isinstance(self._tools, MistralTools):
                out.tool_calls = self._tools.finish_calls()
                self._called = self._called or bool(out.tool_calls)
        return None if not out else out

    def parse_whole(self, text: str) -> ParsedMessage:
        if self._harmony is not None:
            return self._harmony.whole(text)
        reasoning: str | None = None
        content: str | None = text
        if self._reasoning_name:
            reasoning, content = make_reasoning(self._reasoning_name).whole(text)
        calls: list[ToolCall] = []
        if self._tools is not None:
            tools = make_tools(self._tool_name)
            found, tool_content = tools.whole(content or "")
            if not found and isinstance(tools, MistralTools):
                # vLLM's engine-based parsers (mistral) return their own content when nothing parses
                content = tool_content or None
            if found:
                calls = [ToolCall(make_tool_call_id(), n, a) for n, a in found]
                # vLLM: content that is only whitespace beside tool calls becomes None
                content = tool_content if tool_content and tool_content.strip() else None
        self._called = self._called or bool(calls)
        return ParsedMessage(content=content, reasoning=reasoning, tool_calls=calls)


class HarmonyOutput:
    """gpt-oss: analysis messages are reasoning, final (and commentary without a recipient) messages
    content, messages to ``functions.NAME`` tool calls; as vLLM's HarmonyParser. Without the reasoning
    parser analysis text is dropped, without tool parsing tool messages are (vLLM does the same)."""

    def __init__(self, tools: bool, reasoning: bool):
        self._tools, self._reasoning = tools, reasoning
        self._reader = HarmonyReader(self._on_event)
        self._out = OutputDelta()
        self._index = -1
        self.called = False
        self._whole: list[tuple[Header, str]] = []

    def _on_event(self, header: Header, text: str, ended: bool) -> None:
        kind = header.kind()
        if kind == "content":
            self._out.content += text
        elif kind == "reasoning" and self._reasoning:
            self._out.reasoning += text
        elif kind == "tool" and self._tools:
            if not text and not ended:  # a message header: a new call
                self._index += 1
                self.called = True
                self._out.tool_calls.append(
                    ToolCallDelta(index=self._index, id=make_tool_call_id(), name=header.function()))
            elif text:
                self._out.tool_calls.append(ToolCallDelta(index=self._index, arguments=text))

    def feed(self, text: str, final: bool = False) -> OutputDelta | None:
        self._reader.feed(text, final)
        out, self._out = self._out, OutputDelta()
        return None if not out else out

    def whole(self, text: str) -> ParsedMessage:
        messages: list[tuple[Header, list[str]]] = []

        def collect(header: Header, piece: str, ended: bool) -> None:
            if not piece and not ended:
                messages.append((header, []))
            else:
                messages[-1][1].append(piece)

        HarmonyReader(collect).feed(text, final=True)
        reasoning, content, calls = [], [], []
        for header, pieces in messages:
            body, kind = "".join(pieces), header.kind()
            if kind == "reasoning" and self._reasoning and body:
                reasoning.append(body)
            elif kind == "content" and body:
                content.append(body)
            elif kind == "tool" and self._tools:
                args = tool_arguments(header, body)
                calls.append(ToolCall(make_tool_call_id(), header.function(), args))
        self.called = self.called or bool(calls)
        return ParsedMessage(content="\n".join(content) or None, reasoning="\n".join(reasoning) or None,
                             tool_calls=calls)
