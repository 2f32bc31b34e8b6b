"""Parsing of math answers, plain text or LaTeX, into a small tuple AST (no eval, no antlr).

AST nodes: (num, Fraction) (sym, name) (const, pi|e) (neg, a) (add|sub|mul|div|pow, a, b)
(fn, name, a). Bounds on characters, tokens, nesting and digits keep every later step small.
"""
import functools
import re
from fractions import Fraction

MAX_CHARS = 300
MAX_TOKENS = 160
MAX_DEPTH = 40
MAX_DIGITS = 30

_REPLACEMENTS = (
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cdot", "*"), ("\\times", "*"),
    ("\\div", "/"), ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""), ("\\,", " "),
    ("\\;", " "), ("\\:", " "), ("\\!", ""), ("\\ ", " "), ("\\%", ""), ("%", ""), ("~", " "),
    ("×", "*"), ("·", "*"), ("∗", "*"), ("÷", "/"), ("−", "-"), ("–", "-"), ("π", "pi"),
    ("√", "sqrt"), ("²", "^2"), ("³", "^3"), ("$", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""),
    ("\\]", ""),
)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+)|(\\[A-Za-z]+)|([A-Za-z]+)"
                    r"|([-+*/^(){}\[\],=]))")
_FUNCS = ("sqrt", "sin", "cos", "tan", "ln", "log", "exp")
_NAMES = sorted([*_FUNCS, "pi"], key=len, reverse=True)


class Unparsable(ValueError):
  """The text is not an expression this parser accepts (or exceeds its bounds)."""


def _unwrap_boxed(text: str) -> str:
  start = text.find("\\boxed")
  brace = text.find("{", start) if start >= 0 else -1
  if brace < 0:
    return text
  depth = 0
  for i in range(brace, len(text)):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[brace + 1:i]
  return text


def normalize(text: str) -> str:
  """LaTeX and unicode spellings rewritten to the parser's plain syntax; raises Unparsable."""
  text = text.strip()
  if len(text) > MAX_CHARS:
    raise Unparsable(f"longer than {MAX_CHARS} characters")
  text = _DEGREES.sub("", _unwrap_boxed(text))
  # \text{...}: keep numbers and single letters, drop words (units such as "cm").
  text = _TEXT_CMD.sub(lambda m: m.group(1) if re.fullmatch(r"[\d.\s]*|[A-Za-z]", m.group(1))
                       else " ", text)
  for old, new in _REPLACEMENTS:
    text = text.replace(old, new)
  return " ".join(_THOUSANDS.sub("", text).split())


def tokenize(text: str) -> list[tuple[str, str]]:
  """(kind, value) tokens, kind in {num, cmd, name, op}; letter runs split greedily into known
  names (sqrt, pi, ...) and single-letter symbols."""
  tokens, pos = [], 0
  while pos < len(text):
    m = _TOKEN.match(text, pos)
    if m is None:
      raise Unparsable(f"unexpected character {text[pos]!r}")
    pos = m.end()
    num, cmd, letters, op = m.groups()
    if num is not None:
      tokens.append(("num", num))
    elif cmd is not None:
      tokens.append(("cmd", cmd[1:]))
    elif op is not None:
      tokens.append(("op", op))
    else:
      i = 0
      while i < len(letters):
        name = next((n for n in _NAMES if letters.startswith(n, i)), letters[i])
        tokens.append(("name", name))
        i += len(name)
    if len(tokens) > MAX_TOKENS:
      raise Unparsable(f"more than {MAX_TOKENS} tokens")
  return tokens


def _number(text: str) -> tuple:
  mantissa, _, exponent = text.lower().partition("e")
  if len(mantissa.replace(".", "")) > MAX_DIGITS or (exponent and abs(int(exponent)) > 50):
    raise Unparsable(f"number {text!r} too large")
  return ("num", Fraction(mantissa) * Fraction(10) ** int(exponent or 0))


class _Parser:
  """AST nodes: (num, Fraction) (sym, name) (const, pi|e) (neg, a) (add|sub|mul|div|pow, a, b)
  (fn, name, a).

  expr := term (('+'|'-') term)*;  term := unary (('*'|'/'|implicit) unary)*;
  unary := ('-'|'+') unary | power;  power := atom ('^' unary)?
  """

  def __init__(self, tokens):
    self.tokens, self.i, self.depth = tokens, 0, 0

  def peek(self):
    return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

  def take(self, kind=None, value=None):
    tok = self.peek()
    if (kind and tok[0] != kind) or (value and tok[1] != value):
      raise Unparsable(f"expected {value or kind}, got {tok[1] or 'end'}")
    self.i += 1
    return tok

  def at(self, kind, *values):
    tok = self.peek()
    return tok[0] == kind and (not values or tok[1] in values)

  def top(self) -> list:
    """Comma-separated items, each maybe `lhs = rhs`: `x = v` is v, else lhs - rhs."""
    items = [self.equation()]
    while self.at("op", ","):
      self.take()
      items.append(self.equation())
    if self.peek()[0] != "end":
      raise Unparsable(f"unexpected {self.peek()[1]!r}")
    return items

  def equation(self):
    lhs = self.expr()
    if not self.at("op", "="):
      return lhs
    self.take()
    rhs = self.expr()
    return rhs if lhs[0] == "sym" else ("sub", lhs, rhs)

  def expr(self):
    self.depth += 1
    if self.depth > MAX_DEPTH:
      raise Unparsable("nested too deeply")
    value = self.term()
    while self.at("op", "+", "-"):
      op = "add" if self.take()[1] == "+" else "sub"
      value = (op, value, self.term())
    self.depth -= 1
    return value

  def starts_atom(self):
    kind, value = self.peek()
    return kind in ("num", "name", "cmd") or (kind == "op" and value in "({[")

  def term(self):
    value = self.unary()
    while self.at("op", "*", "/") or self.starts_atom():
      op = ("mul" if self.take()[1] == "*" else "div") if self.at("op", "*", "/") else "mul"
      value = (op, value, self.unary())
    return value

  def unary(self):
    if self.at("op", "-", "+"):
      negate = self.take()[1] == "-"
      value = self.unary()
      return ("neg", value) if negate else value
    return self.power()

  def power(self):
    base = self.atom()
    if self.at("op", "^"):
      self.take()
      return ("pow", base, self.unary())
    return base

  def group(self):
    close = {"(": ")", "{": "}", "[": "]"}[self.take("op")[1]]
    value = self.expr()
    self.take("op", close)
    return value

  def argument(self):
    if self.at("op", "(", "{", "["):
      return self.group()
    if self.at("num") and len(self.peek()[1]) > 1 and self.peek()[1].isdigit():
      # \frac12 and \sqrt2: a LaTeX argument without braces is one character.
      digits = self.take()[1]
      self.tokens.insert(self.i, ("num", digits[1:]))
      return ("num", Fraction(int(digits[0])))
    return self.power()

  def atom(self):
    kind, value = self.peek()
    if kind == "op" and value in "({[":
      return self.group()
    self.take()
    if kind == "num":
      return _number(value)
    if kind == "cmd" and value == "frac":
      return ("div", self.argument(), self.argument())
    if kind == "cmd" and value == "sqrt" and self.at("op", "["):
      self.take()
      index = self.expr()
      self.take("op", "]")
      return ("pow", self.argument(), ("div", ("num", Fraction(1)), index))
    if kind in ("cmd", "name") and value in _FUNCS:
      return ("fn", value, self.argument())
    if kind in ("cmd", "name") and value == "pi":
      return ("const", "pi")
    if kind == "name":
      return ("const", "e") if value == "e" else ("sym", value)
    raise Unparsable(f"unsupported {value!r}")


@functools.lru_cache(maxsize=1 << 14)
def parse(text: str) -> tuple:
  """The ASTs of a comma-separated answer; raises Unparsable."""
  tokens = tokenize(normalize(text))
  if not tokens:
    raise Unparsable("empty")
  return tuple(_Parser(tokens).top())
