"""Reading compiled HLO text in tests: instructions of a computation, in-place cache writes."""
import re


def instructions(hlo: str, computation: str):
  """(name, shape, opcode, text) of each instruction of one computation of an HLO module."""
  start = re.search(rf"^%{re.escape(computation)} \(", hlo, re.M).start()
  body = hlo[start:hlo.index("\n}\n", start)].split("\n")[1:]
  for line in body:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])\S* ([\w-]+)\(", line)
    if m:
      yield m.group(1), m.group(2), m.group(3), line


def in_place_writes(hlo: str, loop: str, shapes: set[str]) -> int:
  """Asserts that in the body of the while `loop` (its HLO line) every value of one of `shapes`
  is the loop's own buffer or an in-place dynamic-update-slice of it (no copy); returns how many
  writes there are."""
  body = re.search(r"body=%([\w.\-]+)", loop).group(1)
  updates = 0
  for _, shape, opcode, line in instructions(hlo, body):
    if shape not in shapes:
      continue
    assert opcode in ("get-tuple-element", "fusion", "dynamic-update-slice", "bitcast"), line
    if opcode == "fusion":
      fused = re.search(r"calls=%([\w.\-]+)", line).group(1)
      root = [op for _, _, op, text in instructions(hlo, fused) if "ROOT" in text]
      assert root == ["dynamic-update-slice"], line
    updates += opcode in ("fusion", "dynamic-update-slice")
  return updates
